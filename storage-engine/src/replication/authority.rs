//! What a replica lets a request change, checked against the volume record: a HELLO only at the
//! epoch the record names (never an arbitrary future one, which would fence the real target)
//! and never growing the replica past the recorded size; DROP only once the record no longer
//! needs this node's copy; SHARE and RESTORE only for the snapshot, clone or restore the record
//! says is under way. Data-path requests need no store call: they must carry exactly the epoch
//! this replica last accepted a HELLO at.

use super::frame::{self, Command};
use crate::meta::{PendingOp, VolumeRecord};

/// Why a replica refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The sender's epoch is older than the record's: it is no longer the target.
    #[error("epoch {0} is older than the volume's epoch {1}")]
    Stale(u64, u64),
    /// The record does not allow it.
    #[error("{0}")]
    NotAllowed(String),
    /// The record could not be read: nothing that needs it is done.
    #[error("the volume record cannot be read: {0}")]
    Unavailable(String),
}

impl Refusal {
    pub fn errno(&self) -> u32 {
        match self {
            Refusal::Stale(..) => frame::ESTALE,
            Refusal::NotAllowed(_) => libc::EPERM as u32,
            Refusal::Unavailable(_) => libc::EIO as u32,
        }
    }
}

/// Whether `cmd` may run for volume id `volume` at `epoch` on node `me`, given every volume
/// record, sent by node `from` when its certificate says so (None: an unauthenticated
/// connection, which only the record checks apply to). Only HELLO, SHARE, RESTORE and DROP
/// are checked here; other commands pass.
pub fn check(records: &[VolumeRecord], me: &str, volume: u64, epoch: u64, cmd: &Command<impl Sized>, from: Option<&str>) -> Result<(), Refusal> {
    let rec = records.iter().find(|r| r.id == volume).map(|r| r.clone().normalized(me));
    let not = |why: String| Err(Refusal::NotAllowed(why));
    // Only the recorded target announces itself, and only it shares or restores an attached
    // volume (a detached one, any node of the cluster).
    let not_target = |r: &VolumeRecord| match from {
        Some(f) if f != r.target && (!r.target.is_empty() || matches!(cmd, Command::Hello { .. })) => {
            Some(format!("node {f} is not volume {}'s target ({})", r.name, if r.target.is_empty() { "none" } else { &r.target }))
        }
        _ => None,
    };
    // The volume's record, which must name the request's epoch.
    let recorded = || -> Result<VolumeRecord, Refusal> {
        let r = rec.clone().ok_or_else(|| Refusal::NotAllowed(format!("no volume with id {volume}")))?;
        same_epoch(epoch, r.epoch, || format!("epoch {epoch} is newer than volume {}'s recorded epoch {}", r.name, r.epoch))?;
        Ok(r)
    };
    // ... and that the sender may change (SHARE, RESTORE).
    let recorded_from_target = || -> Result<VolumeRecord, Refusal> {
        let r = recorded()?;
        match not_target(&r) {
            Some(why) => Err(Refusal::NotAllowed(why)),
            None => Ok(r),
        }
    };
    match cmd {
        Command::Drop => match rec {
            None => Ok(()),
            Some(r) if matches!(r.pending, Some(PendingOp::Delete | PendingOp::Create)) || !r.has_replica(me) => Ok(()),
            Some(r) => not(format!("volume {} still lists node {me} as a replica and is not being deleted", r.name)),
        },
        Command::Hello { size } => {
            let r = recorded()?;
            if r.target.is_empty() {
                return not(format!("volume {} is not attached anywhere", r.name));
            }
            if let Some(why) = not_target(&r) {
                return not(why);
            }
            if *size > r.size {
                return not(format!("size {size} is larger than volume {}'s recorded size {}", r.name, r.size));
            }
            Ok(())
        }
        Command::Share { into } => {
            let r = recorded_from_target()?;
            let copy = records.iter().find(|d| d.id == *into).map(|d| d.clone().normalized(me));
            match copy {
                Some(d) if d.pending == Some(PendingOp::Create) && d.has_replica(me) => Ok(()),
                _ => not(format!("no snapshot or clone of volume {} with id {into} is being created on node {me}", r.name)),
            }
        }
        Command::Restore { from } => {
            let r = recorded_from_target()?;
            let Some(PendingOp::Restore { snapshot }) = &r.pending else {
                return not(format!("volume {} is not being restored", r.name));
            };
            match records.iter().find(|s| s.id == *from) {
                Some(s) if &s.name == snapshot => Ok(()),
                _ => not(format!("volume {} is being restored from {snapshot}, not from the volume with id {from}", r.name)),
            }
        }
        _ => Ok(()),
    }
}

/// Whether a command needs `check` (and so the records) before it runs.
pub fn needs_record(cmd: &Command<impl Sized>) -> bool {
    matches!(cmd, Command::Hello { .. } | Command::Share { .. } | Command::Restore { .. } | Command::Drop)
}

/// `epoch` must be `expected`: an older one is stale, a newer one is refused for `newer`.
fn same_epoch(epoch: u64, expected: u64, newer: impl FnOnce() -> String) -> Result<(), Refusal> {
    match epoch.cmp(&expected) {
        std::cmp::Ordering::Less => Err(Refusal::Stale(epoch, expected)),
        std::cmp::Ordering::Greater => Err(Refusal::NotAllowed(newer())),
        std::cmp::Ordering::Equal => Ok(()),
    }
}

/// A data-path request's epoch against the newest this replica accepted a HELLO at: older is
/// stale, newer was never announced (a HELLO checked against the record comes first).
pub fn data_epoch(newest: u64, epoch: u64) -> Result<(), Refusal> {
    same_epoch(epoch, newest, || format!("epoch {epoch} was never announced to this replica (it is at {newest})"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn vol() -> VolumeRecord {
        let nodes: Vec<String> = ["a", "b"].map(String::from).to_vec();
        VolumeRecord {
            id: 1,
            name: "v".into(),
            size: 1 << 30,
            node: "a".into(),
            in_sync: nodes.clone(),
            replicas: nodes,
            target: "a".into(),
            epoch: 5,
            ..Default::default()
        }
    }

    fn check1(recs: &[VolumeRecord], epoch: u64, cmd: Command<Bytes>) -> Result<(), Refusal> {
        check(recs, "b", 1, epoch, &cmd, None)
    }

    #[test]
    fn hello_only_at_the_recorded_epoch_and_size() {
        let r = [vol()];
        assert_eq!(check1(&r, 5, Command::Hello { size: 1 << 30 }), Ok(()));
        assert_eq!(check1(&r, 4, Command::Hello { size: 1 << 30 }), Err(Refusal::Stale(4, 5)));
        assert!(matches!(check1(&r, u64::MAX, Command::Hello { size: 1 << 30 }), Err(Refusal::NotAllowed(_))));
        assert!(matches!(check1(&r, 5, Command::Hello { size: 1 << 40 }), Err(Refusal::NotAllowed(_))), "no growing past the record");
        let mut detached = vol();
        detached.target.clear();
        assert!(matches!(check1(&[detached], 5, Command::Hello { size: 1 << 30 }), Err(Refusal::NotAllowed(_))));
        assert!(matches!(check(&r, "b", 9, 5, &Command::<Bytes>::Hello { size: 1 }, None), Err(Refusal::NotAllowed(_))), "unknown volume");
        // With certificates: only the recorded target says hello.
        assert_eq!(check(&r, "b", 1, 5, &Command::<Bytes>::Hello { size: 1 << 30 }, Some("a")), Ok(()));
        assert!(matches!(check(&r, "b", 1, 5, &Command::<Bytes>::Hello { size: 1 << 30 }, Some("c")), Err(Refusal::NotAllowed(_))));
    }

    #[test]
    fn drop_only_once_the_record_lets_the_copy_go() {
        assert!(matches!(check1(&[vol()], u64::MAX, Command::Drop), Err(Refusal::NotAllowed(_))), "a live replica");
        let mut deleting = vol();
        deleting.pending = Some(PendingOp::Delete);
        assert_eq!(check1(&[deleting], u64::MAX, Command::Drop), Ok(()));
        let mut moved = vol();
        moved.replicas.retain(|n| n != "b");
        moved.in_sync.retain(|n| n != "b");
        assert_eq!(check1(&[moved], 0, Command::Drop), Ok(()), "no longer a replica here");
        assert_eq!(check1(&[], 0, Command::Drop), Ok(()), "the volume is gone");
    }

    #[test]
    fn share_and_restore_only_for_the_operation_under_way() {
        let mut snap = vol();
        snap.id = 2;
        snap.name = "s".into();
        snap.snapshot_of = Some("v".into());
        snap.pending = Some(PendingOp::Create);
        assert_eq!(check1(&[vol(), snap.clone()], 5, Command::Share { into: 2 }), Ok(()));
        assert!(matches!(check(&[vol(), snap.clone()], "b", 1, 5, &Command::<Bytes>::Share { into: 2 }, Some("c")), Err(Refusal::NotAllowed(_))));
        let mut detached = vol();
        detached.target.clear();
        assert_eq!(
            check(&[detached, snap.clone()], "b", 1, 5, &Command::<Bytes>::Share { into: 2 }, Some("c")),
            Ok(()),
            "any node snapshots a detached volume"
        );
        assert!(matches!(check1(&[vol(), snap.clone()], 5, Command::Share { into: 3 }), Err(Refusal::NotAllowed(_))));
        assert!(matches!(check1(&[vol(), snap.clone()], 6, Command::Share { into: 2 }), Err(Refusal::NotAllowed(_))));
        let mut done = snap.clone();
        done.pending = None;
        assert!(matches!(check1(&[vol(), done.clone()], 5, Command::Share { into: 2 }), Err(Refusal::NotAllowed(_))), "already made");
        assert!(matches!(check1(&[vol(), done.clone()], 5, Command::Restore { from: 2 }), Err(Refusal::NotAllowed(_))), "no restore under way");
        let mut restoring = vol();
        restoring.pending = Some(PendingOp::Restore { snapshot: "s".into() });
        assert_eq!(check1(&[restoring.clone(), done.clone()], 5, Command::Restore { from: 2 }), Ok(()));
        assert!(matches!(check1(&[restoring, done], 5, Command::Restore { from: 1 }), Err(Refusal::NotAllowed(_))));
    }

    #[test]
    fn data_requests_carry_the_announced_epoch() {
        assert_eq!(data_epoch(5, 5), Ok(()));
        assert_eq!(data_epoch(5, 4), Err(Refusal::Stale(4, 5)));
        assert!(matches!(data_epoch(5, u64::MAX), Err(Refusal::NotAllowed(_))));
    }
}
