//! Rolling upgrade of the engines, decided by a pure function: replace (delete) engine pods that
//! run an old version, at most `maxUnavailable` at a time, and only while every engine pod is
//! ready and every volume is fully in sync (no resync, no replica comparison in progress) — so a
//! node goes down only when the others hold every acknowledged write. The reconciler puts each
//! node in maintenance (reason "upgrade") before its pod goes, and ends it once the new pod is
//! ready.

use crate::crd::UpdateKind;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnginePod {
    pub name: String,
    pub node: String,
    /// The `strata.dev/version` the pod was created with.
    pub version: String,
    pub ready: bool,
    /// Being deleted (the DaemonSet has not replaced it yet): never deleted a second time.
    pub terminating: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Every engine runs the desired version.
    Done,
    /// Delete these pods (the DaemonSet recreates them with the new template).
    Replace(Vec<String>),
    /// An upgrade is due but must wait, for this reason.
    Wait(String),
    /// `OnDelete`: pods are replaced by the user.
    Manual(usize),
}

/// The volumes' replication state, as the engines report it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeSync {
    pub volumes: usize,
    /// Volumes with a replica out of sync or a comparison running, by name.
    pub not_in_sync: Vec<String>,
}

pub fn next_step(pods: &[EnginePod], desired: &str, kind: UpdateKind, max_unavailable: u32, sync: &VolumeSync) -> Step {
    let outdated: Vec<&EnginePod> = pods.iter().filter(|p| p.version != desired || p.terminating).collect();
    if outdated.is_empty() {
        return Step::Done;
    }
    if kind == UpdateKind::OnDelete {
        return Step::Manual(outdated.len());
    }
    let unready: Vec<&EnginePod> = pods.iter().filter(|p| !p.ready || p.terminating).collect();
    let budget = (max_unavailable.max(1) as usize).saturating_sub(unready.len());
    if budget == 0 {
        return Step::Wait(format!("waiting for engine pod(s) {} to be ready", names(&unready)));
    }
    if !sync.not_in_sync.is_empty() {
        return Step::Wait(format!("waiting for volume(s) {} to be back in sync", sync.not_in_sync.join(", ")));
    }
    // Unready outdated pods first (replacing them costs nothing), then by name for determinism;
    // a pod already being deleted is waited for, not deleted again.
    let mut order: Vec<&EnginePod> = outdated.into_iter().filter(|p| !p.terminating).collect();
    order.sort_by(|a, b| a.ready.cmp(&b.ready).then(a.name.cmp(&b.name)));
    Step::Replace(order.into_iter().take(budget).map(|p| p.name.clone()).collect())
}

fn names(p: &[&EnginePod]) -> String {
    p.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, version: &str, ready: bool) -> EnginePod {
        EnginePod { name: name.into(), node: format!("node-{name}"), version: version.into(), ready, terminating: false }
    }

    #[test]
    fn a_pod_being_deleted_is_waited_for_not_deleted_again() {
        let synced = VolumeSync { volumes: 1, not_in_sync: vec![] };
        // a was deleted for the upgrade; the next pass still sees it (old version, terminating).
        let mut a = pod("a", "1", true);
        a.terminating = true;
        let pods = vec![a.clone(), pod("b", "1", true)];
        assert!(matches!(next_step(&pods, "2", UpdateKind::RollingUpdate, 1, &synced), Step::Wait(w) if w.contains("a")));
        assert_eq!(next_step(&pods, "2", UpdateKind::RollingUpdate, 2, &synced), Step::Replace(vec!["b".into()]), "budget 2: one deleting, one more");
        let mut new_a = pod("a", "2", true);
        new_a.terminating = true;
        assert!(matches!(next_step(&[new_a], "2", UpdateKind::RollingUpdate, 1, &synced), Step::Wait(_)), "not done while a pod is going away");
    }

    #[test]
    fn one_node_at_a_time_and_only_when_in_sync() {
        let synced = VolumeSync { volumes: 3, not_in_sync: vec![] };
        let pods = vec![pod("a", "1", true), pod("b", "1", true), pod("c", "2", true)];
        assert_eq!(next_step(&pods, "2", UpdateKind::RollingUpdate, 1, &synced), Step::Replace(vec!["a".into()]));
        assert_eq!(next_step(&pods, "2", UpdateKind::RollingUpdate, 2, &synced), Step::Replace(vec!["a".into(), "b".into()]));
        let resyncing = VolumeSync { volumes: 3, not_in_sync: vec!["db".into()] };
        assert_eq!(next_step(&pods, "2", UpdateKind::RollingUpdate, 1, &resyncing), Step::Wait("waiting for volume(s) db to be back in sync".into()));
        let restarting = vec![pod("a", "2", false), pod("b", "1", true), pod("c", "2", true)];
        assert!(matches!(next_step(&restarting, "2", UpdateKind::RollingUpdate, 1, &synced), Step::Wait(w) if w.contains("a")));
        assert_eq!(next_step(&pods, "2", UpdateKind::OnDelete, 1, &synced), Step::Manual(2));
        let done = vec![pod("a", "2", true), pod("b", "2", false)];
        assert_eq!(next_step(&done, "2", UpdateKind::RollingUpdate, 1, &resyncing), Step::Done);
        let broken_old = vec![pod("a", "1", true), pod("b", "1", false)];
        assert_eq!(
            next_step(&broken_old, "2", UpdateKind::RollingUpdate, 2, &synced),
            Step::Replace(vec!["b".into()]),
            "an unready old pod goes first"
        );
    }
}
