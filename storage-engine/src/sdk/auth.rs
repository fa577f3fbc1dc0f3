//! Who may call the SDK: a bearer token checked on every call, the role each call needs, the
//! volume's owner and collaborators, and an audit line for every change.
//!
//! Without `--auth-system-key-file` the SDK is open (the engine warns): every caller acts as an
//! admin named `anonymous`.

// These checks answer gRPC calls: their errors are the tonic::Status the caller gets.
#![allow(clippy::result_large_err)]

use crate::meta::{Access, Ownership, VolumeRecord};
pub use crate::security::tokens::Auth;
use std::sync::Arc;
use strata_api::auth::{Caller, Role};
use strata_api::v1 as pb;
use tonic::{Request, Status};

/// The caller when tokens are not checked.
fn anonymous() -> Caller {
    Caller { subject: "anonymous".into(), issuer: String::new(), role: Some(Role::Admin), groups: Vec::new() }
}

/// The token a request carries, as sent (for forwarding it to the engine that serves a volume).
pub fn token_of<T>(req: &Request<T>) -> Option<String> {
    let v = req.metadata().get(strata_api::auth::HEADER)?.to_str().ok()?;
    Some(strata_api::auth::bearer(v).to_string()).filter(|t| !t.is_empty())
}

/// Who made the request: its token verified, or `anonymous` when tokens are not checked.
pub fn caller<T>(auth: Option<&Arc<Auth>>, req: &Request<T>) -> Result<Caller, Status> {
    let Some(a) = auth else { return Ok(anonymous()) };
    let token = token_of(req).unwrap_or_default();
    a.verifier.verify(&token).map_err(|e| {
        tracing::info!(target: "strata::audit", denied = true, reason = %e, "SDK call refused: bad or missing token");
        let unknown = Caller { subject: String::new(), issuer: String::new(), role: None, groups: Vec::new() };
        audit_line(&unknown, "authenticate", "", "denied", serde_json::json!({ "why": e.to_string() }));
        Status::unauthenticated(e.to_string())
    })
}

/// `op` needs at least `role`.
pub fn require(who: &Caller, role: Role, op: &str) -> Result<(), Status> {
    if who.role.is_some_and(|r| r >= role) {
        return Ok(());
    }
    let has = who.role.map(Role::as_str).unwrap_or("no role");
    audit_denied(who, op, "", "role");
    Err(Status::permission_denied(format!("{op} needs role {} or higher; the token of {:?} grants {has}", role.as_str(), who.subject)))
}

/// Whether `who` may see `rec` (list and snapshot list leave out what it may not).
pub fn may_see(who: &Caller, rec: &VolumeRecord) -> bool {
    matches!(who.role, Some(Role::Admin | Role::View)) || rec.ownership.access(&who.subject, &who.groups).is_some()
}

/// `op` on volume `rec` needs `need` (and the role a user has): admins always pass, viewers for
/// reads, others as owner or collaborator.
pub fn may(who: &Caller, rec: &VolumeRecord, need: Access, op: &str) -> Result<(), Status> {
    let ok = match who.role {
        Some(Role::Admin) => true,
        Some(Role::View) => need == Access::Read,
        Some(Role::User) => rec.ownership.access(&who.subject, &who.groups).is_some_and(|a| a >= need),
        None => false,
    };
    if ok {
        return Ok(());
    }
    audit_denied(who, op, &rec.name, "ownership");
    let owner = if rec.ownership.owner.is_empty() { "no owner (admins only)".to_string() } else { format!("owner {:?}", rec.ownership.owner) };
    Err(Status::permission_denied(format!(
        "{op}: {:?} may not {} volume {} ({owner}); ask its owner to add you as a collaborator (stratactl volume update {} --collaborator {}=…)",
        who.subject,
        if need == Access::Write { "change or use" } else { "read" },
        rec.name,
        rec.name,
        who.subject
    )))
}

/// The audit log file (`<data-dir>/audit.jsonl`): one JSON line per change or refusal,
/// whatever the log level. Set once by the engine at start; without it audit lines go to the
/// log only.
static AUDIT_FILE: std::sync::OnceLock<parking_lot::Mutex<std::fs::File>> = std::sync::OnceLock::new();

/// Appends audit lines to `path` from now on.
pub fn open_audit_log(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let f = std::fs::OpenOptions::new().append(true).create(true).mode(0o600).open(path)?;
    let _ = AUDIT_FILE.set(parking_lot::Mutex::new(f));
    Ok(())
}

fn audit_line(who: &Caller, op: &str, volume: &str, outcome: &str, detail: serde_json::Value) {
    let Some(f) = AUDIT_FILE.get() else { return };
    let mut line = serde_json::json!({
        "time": crate::clock::now_unix(),
        "user": who.subject,
        "issuer": who.issuer,
        "op": op,
        "volume": volume,
        "outcome": outcome,
    });
    if let (Some(l), serde_json::Value::Object(d)) = (line.as_object_mut(), detail) {
        l.extend(d);
    }
    use std::io::Write as _;
    if let Err(e) = writeln!(f.lock(), "{line}") {
        tracing::warn!("audit log: {e}");
    }
}

fn audit_denied(who: &Caller, op: &str, volume: &str, why: &str) {
    tracing::info!(target: "strata::audit", user = %who.subject, issuer = %who.issuer, op, volume, denied = true, why, "SDK call refused");
    audit_line(who, op, volume, "denied", serde_json::json!({ "why": why }));
}

/// The audit line of a change: who, what, on which volume, and how it ended.
pub fn audit<R>(who: &Caller, op: &str, volume: &str, forwarded: bool, result: &Result<R, Status>) {
    match result {
        Ok(_) => {
            tracing::info!(target: "strata::audit", user = %who.subject, issuer = %who.issuer, op, volume, forwarded, "ok");
            audit_line(who, op, volume, "ok", serde_json::json!({ "forwarded": forwarded }));
        }
        Err(s) => {
            tracing::info!(target: "strata::audit", user = %who.subject, issuer = %who.issuer, op, volume, forwarded, code = ?s.code(), error = %s.message(), "failed");
            audit_line(
                who,
                op,
                volume,
                "failed",
                serde_json::json!({ "forwarded": forwarded, "code": format!("{:?}", s.code()), "error": s.message() }),
            );
        }
    }
}

/// A request's ownership, checked.
pub fn ownership_from_pb(o: pb::Ownership) -> Result<Ownership, Status> {
    let parse = |m: std::collections::HashMap<String, String>, what: &str| {
        m.into_iter()
            .map(|(k, v)| {
                if k.trim().is_empty() {
                    return Err(Status::invalid_argument(format!("ownership: an empty {what} name")));
                }
                Access::parse(&v)
                    .map(|a| (k.clone(), a))
                    .ok_or_else(|| Status::invalid_argument(format!("ownership: {what} {k}: access {v:?} is neither \"read\" nor \"write\"")))
            })
            .collect::<Result<_, _>>()
    };
    Ok(Ownership { owner: o.owner.trim().to_string(), users: parse(o.users, "user")?, groups: parse(o.groups, "group")? })
}

pub fn ownership_pb(o: &Ownership) -> pb::Ownership {
    let conv = |m: &std::collections::BTreeMap<String, Access>| m.iter().map(|(k, a)| (k.clone(), a.as_str().to_string())).collect();
    pb::Ownership { owner: o.owner.clone(), users: conv(&o.users), groups: conv(&o.groups) }
}

/// The ownership of a new volume: the caller owns it; an admin may name another owner.
pub fn new_ownership(who: &Caller, asked: Option<pb::Ownership>, checking: bool) -> Result<Ownership, Status> {
    let mut o = asked.map(ownership_from_pb).transpose()?.unwrap_or_default();
    // An admin naming an owner gets that owner; anyone else owns what they make.
    let named_by_admin = who.is_admin() && !o.owner.is_empty();
    if checking && !named_by_admin {
        o.owner = who.subject.clone();
    }
    Ok(o)
}

/// A change of ownership: the owner changes collaborators, an admin anything.
pub fn may_change_ownership(who: &Caller, rec: &VolumeRecord, next: &Ownership) -> Result<(), Status> {
    if who.is_admin() {
        return Ok(());
    }
    if rec.ownership.owner != who.subject {
        audit_denied(who, "volume.update", &rec.name, "ownership change");
        return Err(Status::permission_denied(format!("only volume {}'s owner or an admin may change who may use it", rec.name)));
    }
    if next.owner != rec.ownership.owner {
        audit_denied(who, "volume.update", &rec.name, "owner change");
        return Err(Status::permission_denied(format!("only an admin may give volume {} to another owner", rec.name)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(sub: &str, role: Role, groups: &[&str]) -> Caller {
        Caller { subject: sub.into(), issuer: "t".into(), role: Some(role), groups: groups.iter().map(|g| g.to_string()).collect() }
    }

    fn vol() -> VolumeRecord {
        let mut o = Ownership::owned_by("alice");
        o.users.insert("bob".into(), Access::Read);
        o.groups.insert("ops".into(), Access::Write);
        VolumeRecord { name: "db".into(), ownership: o, ..Default::default() }
    }

    #[test]
    fn owners_collaborators_and_roles() {
        let v = vol();
        assert!(may(&who("alice", Role::User, &[]), &v, Access::Write, "x").is_ok());
        assert!(may(&who("bob", Role::User, &[]), &v, Access::Read, "x").is_ok());
        assert_eq!(may(&who("bob", Role::User, &[]), &v, Access::Write, "x").unwrap_err().code(), tonic::Code::PermissionDenied);
        assert!(may(&who("carol", Role::User, &["ops"]), &v, Access::Write, "x").is_ok());
        assert!(may(&who("mallory", Role::User, &["dev"]), &v, Access::Read, "x").is_err());
        assert!(!may_see(&who("mallory", Role::User, &[]), &v));
        assert!(may(&who("viewer", Role::View, &[]), &v, Access::Read, "x").is_ok());
        assert!(may(&who("viewer", Role::View, &[]), &v, Access::Write, "x").is_err());
        assert!(may(&who("root", Role::Admin, &[]), &v, Access::Write, "x").is_ok());
        // A volume without an owner is for admins only.
        let unowned = VolumeRecord { name: "old".into(), ..Default::default() };
        assert!(may(&who("alice", Role::User, &[]), &unowned, Access::Read, "x").is_err());
        let none = Caller { role: None, ..who("x", Role::User, &[]) };
        assert!(require(&none, Role::View, "x").is_err());
        assert!(require(&who("v", Role::View, &[]), Role::User, "x").is_err());
    }

    #[test]
    fn only_admins_give_volumes_away() {
        let v = vol();
        let mut next = v.ownership.clone();
        next.users.insert("dave".into(), Access::Write);
        assert!(may_change_ownership(&who("alice", Role::User, &[]), &v, &next).is_ok());
        assert!(may_change_ownership(&who("carol", Role::User, &["ops"]), &v, &next).is_err());
        next.owner = "mallory".into();
        assert!(may_change_ownership(&who("alice", Role::User, &[]), &v, &next).is_err());
        assert!(may_change_ownership(&who("root", Role::Admin, &[]), &v, &next).is_ok());
        // A user's new volume is theirs whatever owner they ask for; an admin's as asked.
        let asked = pb::Ownership { owner: "mallory".into(), ..Default::default() };
        assert_eq!(new_ownership(&who("alice", Role::User, &[]), Some(asked.clone()), true).unwrap().owner, "alice");
        assert_eq!(new_ownership(&who("root", Role::Admin, &[]), Some(asked), true).unwrap().owner, "mallory");
        let bad = pb::Ownership { users: [("bob".to_string(), "all".to_string())].into(), ..Default::default() };
        assert_eq!(ownership_from_pb(bad).unwrap_err().code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn system_tokens_verify_as_admin_of_this_node() {
        let a = Auth::new("n1", &[b'k'; 32], &[], "strata", std::time::Duration::from_secs(30)).unwrap();
        let c = a.verifier.verify(&a.system_token()).unwrap();
        assert_eq!((c.subject.as_str(), c.role), ("node/n1", Some(Role::Admin)));
        assert!(Auth::new("n1", b"short", &[], "strata", std::time::Duration::from_secs(30)).is_err());
    }
}
