//! What stratactl prints: pure functions from the SDK's answers to text (pxctl-style tables and
//! messages) or JSON (`--json`), each returning the whole output, so they are tested without an
//! engine. `run` parses, calls the SDK, then prints what these return.

use crate::table::Table;
use serde_json::json;
use std::collections::HashMap;
use strata_api::units::format_size;
use strata_api::v1 as pb;

/// JSON output: one document and a newline.
pub fn doc(v: serde_json::Value) -> String {
    format!("{v}\n")
}

pub fn volume_json(v: &pb::Volume) -> serde_json::Value {
    let spec = v.spec.clone().unwrap_or_default();
    json!({
        "id": v.id.to_string(),
        "name": v.name,
        "size_bytes": spec.size_bytes,
        "repl": spec.repl,
        "labels": spec.labels,
        "qos": spec.qos.map(|q| json!({"io_throttle_rd_iops": q.rd_iops, "io_throttle_wr_iops": q.wr_iops, "io_throttle_rd_bw": q.rd_bw, "io_throttle_wr_bw": q.wr_bw})),
        "used_bytes": v.used_bytes,
        "state": v.state,
        "connections": v.connections,
        "attached_node": v.attached_node,
        "secure": v.spec.as_ref().is_some_and(|s| s.secure),
        "replica_nodes": v.replica_nodes,
        "in_sync_nodes": v.in_sync_nodes,
        "epoch": v.epoch,
        "replica_status": v.replica_status.iter().map(|r| json!({
            "node": r.node, "state": r.state, "dirty_bytes": r.dirty_bytes, "copied_bytes": r.copied_bytes,
        })).collect::<Vec<_>>(),
        "pool_uuid": v.pool_uuid,
        "created_unix": v.created_unix,
        "snapshot_of": (!v.snapshot_of.is_empty()).then_some(&v.snapshot_of),
        "ownership": spec.ownership.as_ref().map(|o| json!({"owner": o.owner, "users": o.users, "groups": o.groups})),
    })
}

fn ownership_text(o: Option<&pb::Ownership>) -> (String, String) {
    let Some(o) = o else { return ("-".into(), "-".into()) };
    let mut c: Vec<String> = o.users.iter().map(|(k, a)| format!("{k}={a}")).chain(o.groups.iter().map(|(k, a)| format!("group:{k}={a}"))).collect();
    c.sort();
    let owner = if o.owner.is_empty() { "-".to_string() } else { o.owner.clone() };
    (owner, if c.is_empty() { "-".into() } else { c.join(",") })
}

/// `context list`: names, endpoints and whether a token is saved (never the token).
pub fn contexts(all: &crate::context::Contexts, json: bool) -> String {
    if json {
        let v: Vec<_> = all
            .contexts
            .iter()
            .map(|(name, c)| json!({"name": name, "endpoint": c.endpoint, "token": !c.token.is_empty(), "ca_file": c.ca_file, "current": *name == all.current}))
            .collect();
        return doc(serde_json::Value::Array(v));
    }
    let mut t = Table::new(&["CURRENT", "NAME", "ENDPOINT", "TOKEN", "CA"]);
    for (name, c) in &all.contexts {
        let current = if *name == all.current { "*" } else { "" };
        let ca = c.ca_file.clone().unwrap_or_else(|| "- (plaintext)".into());
        t.row(vec![current.into(), name.clone(), c.endpoint.clone(), if c.token.is_empty() { "no" } else { "yes" }.into(), ca]);
    }
    t.render()
}

pub fn labels_text(l: &HashMap<String, String>) -> String {
    let mut v: Vec<String> = l.iter().map(|(k, v)| format!("{k}={v}")).collect();
    v.sort();
    v.join(",")
}

fn qos_text(q: Option<&pb::QosLimits>) -> String {
    let Some(q) = q else { return "unlimited".into() };
    let mut parts = Vec::new();
    if q.rd_iops > 0 {
        parts.push(format!("read {} IOPS", q.rd_iops));
    }
    if q.wr_iops > 0 {
        parts.push(format!("write {} IOPS", q.wr_iops));
    }
    if q.rd_bw > 0 {
        parts.push(format!("read {}/s", format_size(q.rd_bw)));
    }
    if q.wr_bw > 0 {
        parts.push(format!("write {}/s", format_size(q.wr_bw)));
    }
    if parts.is_empty() {
        "unlimited".into()
    } else {
        parts.join(", ")
    }
}

/// `volume inspect`: every field of one volume, and each replica's state.
fn volume_fields(v: &pb::Volume) -> String {
    let spec = v.spec.clone().unwrap_or_default();
    let mut t = Table::new(&["FIELD", "VALUE"]);
    for (k, val) in [
        ("Name", v.name.clone()),
        ("ID", v.id.to_string()),
        ("Size", format_size(spec.size_bytes)),
        ("Used", format_size(v.used_bytes)),
        ("Replicas", spec.repl.to_string()),
        ("State", v.state.clone()),
        ("Attached on", if v.attached_node.is_empty() { "(detached)".into() } else { v.attached_node.clone() }),
        ("Epoch", v.epoch.to_string()),
        ("Replica nodes", v.replica_nodes.join(",")),
        ("In sync", v.in_sync_nodes.join(",")),
        ("Verifying replicas", if v.verifying { "yes (after an unclean change of target)".into() } else { "no".into() }),
        ("NBD clients", v.connections.to_string()),
        ("Labels", labels_text(&spec.labels)),
        ("QoS", qos_text(spec.qos.as_ref())),
        ("Encrypted", if spec.secure { "yes (AES-256-XTS)".into() } else { "no".into() }),
        ("Pool", v.pool_uuid.clone()),
        ("Snapshot of", if v.snapshot_of.is_empty() { "-".into() } else { v.snapshot_of.clone() }),
        ("Owner", ownership_text(spec.ownership.as_ref()).0),
        ("Collaborators", ownership_text(spec.ownership.as_ref()).1),
    ] {
        t.row(vec![k.into(), val]);
    }
    for r in &v.replica_status {
        let mut line = r.state.clone();
        if r.dirty_bytes > 0 || r.copied_bytes > 0 {
            line += &format!(" ({} to copy, {} copied)", format_size(r.dirty_bytes), format_size(r.copied_bytes));
        }
        t.row(vec![format!("Replica {}", r.node), line]);
    }
    t.render()
}

/// One replica's resync, for `inspect --watch` without a terminal.
pub fn resync_line(r: &pb::ReplicaStatus) -> String {
    let (copied, total) = crate::watch::progress(r);
    let pct = (copied * 100).checked_div(total).unwrap_or(0);
    format!("replica {}: {} {} of {} copied ({pct}%)", r.node, r.state, format_size(copied), format_size(total))
}

/// A volume's resync state, for `inspect --watch --json` (one object per look).
pub fn resync_json(v: &pb::Volume) -> serde_json::Value {
    json!({
        "name": v.name,
        "in_sync": crate::watch::settled(v),
        "in_sync_nodes": v.in_sync_nodes,
        "replicas": v.replica_status.iter().map(|r| json!({"node": r.node, "state": r.state, "copied_bytes": r.copied_bytes, "dirty_bytes": r.dirty_bytes})).collect::<Vec<_>>(),
    })
}

fn node_json(n: &pb::Node) -> serde_json::Value {
    json!({"id": n.id, "hostname": n.hostname, "status": n.status, "sdk_address": n.sdk_address, "nbd_address": n.nbd_address,
           "repl_address": n.repl_address, "zone": n.zone, "rack": n.rack,
           "total_bytes": n.total_bytes, "used_bytes": n.used_bytes, "version": n.version, "maintenance": n.maintenance,
           "maintenance_reason": n.maintenance_reason})
}

fn nodes_table(nodes: &[pb::Node]) -> String {
    let mut t = Table::new(&["ID", "HOSTNAME", "STATUS", "CAPACITY", "USED", "ZONE", "RACK", "SDK", "REPLICATION", "VERSION"]);
    let or_dash = |s: &str| if s.is_empty() { "-".to_string() } else { s.to_string() };
    for n in nodes {
        t.row(vec![
            n.id.clone(),
            n.hostname.clone(),
            n.status.clone(),
            format_size(n.total_bytes),
            format_size(n.used_bytes),
            or_dash(&n.zone),
            or_dash(&n.rack),
            n.sdk_address.clone(),
            or_dash(&n.repl_address),
            n.version.clone(),
        ]);
    }
    t.render()
}

/// `status`.
pub fn status(s: &pb::ClusterStatusResponse, json: bool) -> String {
    if json {
        return doc(json!({
            "cluster_id": s.cluster_id, "status": s.status, "version": s.version, "metadata_store": s.metadata_store,
            "total_bytes": s.total_bytes, "used_bytes": s.used_bytes, "volume_count": s.volume_count, "snapshot_count": s.snapshot_count,
            "nodes": s.nodes.iter().map(node_json).collect::<Vec<_>>(),
        }));
    }
    format!(
        "Status: {}\nCluster ID: {}\nMetadata store: {}\nVersion: {}\nCapacity: {} used of {} ({} nodes)\nVolumes: {}\nSnapshots: {}\n\n{}",
        s.status,
        s.cluster_id,
        s.metadata_store,
        s.version,
        format_size(s.used_bytes),
        format_size(s.total_bytes),
        s.nodes.len(),
        s.volume_count,
        s.snapshot_count,
        nodes_table(&s.nodes)
    )
}

/// What `volume ha-update` did, from the replica nodes `before` it and the volume after.
pub fn ha_update_text(v: &pb::Volume, before: &[String]) -> String {
    let added: Vec<&str> = v.replica_nodes.iter().filter(|n| !before.contains(n)).map(String::as_str).collect();
    let removed: Vec<&str> = before.iter().filter(|n| !v.replica_nodes.contains(n)).map(String::as_str).collect();
    let mut what = Vec::new();
    if !added.is_empty() {
        what.push(format!("added a replica on {} (it fills in the background; `volume inspect` shows progress)", added.join(",")));
    }
    if !removed.is_empty() {
        what.push(format!("removed the replica on {}", removed.join(",")));
    }
    if what.is_empty() {
        what.push("no change".into());
    }
    format!("Volume {}: {}; replicas on {} (in sync: {})", v.name, what.join("; "), v.replica_nodes.join(","), v.in_sync_nodes.join(","))
}

/// `alerts show --type --since`: keeps the alerts of one of `kinds` (any case; all when empty)
/// raised last at or after `after` (Unix seconds).
pub fn keep_alerts(alerts: &mut Vec<pb::Alert>, kinds: &[String], after: u64) {
    alerts.retain(|a| a.last_unix >= after && (kinds.is_empty() || kinds.iter().any(|k| k.eq_ignore_ascii_case(&a.kind))));
}

/// `volume locate`: where a volume's target and replicas are, and its NBD export (served on
/// the target node only: loopback and its unix socket).
pub fn volume_locate(v: &pb::Volume, nodes: &[pb::Node], json: bool) -> String {
    let node = |id: &str| nodes.iter().find(|n| n.id == id);
    let nbd = node(&v.attached_node).filter(|n| !n.nbd_address.is_empty()).map(|n| format!("nbd://{}/{}", n.nbd_address, v.name));
    let replicas: Vec<(String, bool, String)> = v
        .replica_nodes
        .iter()
        .map(|r| (r.clone(), v.in_sync_nodes.contains(r), node(r).map_or_else(|| "unknown".to_string(), |n| n.status.clone())))
        .collect();
    if json {
        return doc(json!({
            "volume": v.name, "target": v.attached_node, "nbd_uri": nbd,
            "replicas": replicas.iter().map(|(n, s, st)| json!({"node": n, "in_sync": s, "node_status": st, "zone": node(n).map(|x| x.zone.clone()), "rack": node(n).map(|x| x.rack.clone())})).collect::<Vec<_>>(),
        }));
    }
    let mut t = Table::new(&["NODE", "ROLE", "REPLICA", "NODE STATUS", "ZONE", "RACK"]);
    let or_dash = |s: &str| if s.is_empty() { "-".to_string() } else { s.to_string() };
    for (n, in_sync, status) in &replicas {
        let role = if *n == v.attached_node { "target" } else { "replica" };
        let (zone, rack) = node(n).map_or(("-".into(), "-".into()), |x| (or_dash(&x.zone), or_dash(&x.rack)));
        t.row(vec![n.clone(), role.into(), if *in_sync { "in sync".into() } else { "out of sync".into() }, status.clone(), zone, rack]);
    }
    let served = match (&nbd, v.attached_node.is_empty()) {
        (_, true) => "detached: no node serves it (an NBD client opening it on a replica node attaches it there)".to_string(),
        (Some(u), false) => format!("{u} (on node {}: loopback, and its --nbd-socket)", v.attached_node),
        (None, false) => format!("on node {} (address unknown)", v.attached_node),
    };
    format!("Volume {}\nTarget: {}\nNBD: {served}\n\n{}", v.name, or_dash(&v.attached_node), t.render())
}

/// `cluster inspect`: one node.
pub fn node_inspect(n: &pb::Node, json: bool) -> String {
    if json {
        return doc(node_json(n));
    }
    let mut t = Table::new(&["FIELD", "VALUE"]);
    for (k, val) in [
        ("ID", n.id.clone()),
        ("Hostname", n.hostname.clone()),
        ("Status", n.status.clone()),
        ("Version", n.version.clone()),
        ("Capacity", format!("{} used of {}", format_size(n.used_bytes), format_size(n.total_bytes))),
        ("Zone", n.zone.clone()),
        ("Rack", n.rack.clone()),
        ("SDK", n.sdk_address.clone()),
        ("Replication", n.repl_address.clone()),
        ("NBD", n.nbd_address.clone()),
    ] {
        t.row(vec![k.into(), if val.is_empty() { "-".into() } else { val }]);
    }
    t.render()
}

/// `service maintenance`: the node and where its volumes went.
pub fn maintenance(n: &pb::Node, moved: &[pb::MovedTarget], enter: bool, json: bool) -> String {
    if json {
        let moved: Vec<serde_json::Value> =
            moved.iter().map(|m| json!({"volume": m.volume, "node": m.node, "note": m.note, "failed": m.failed})).collect();
        return doc(json!({"node": node_json(n), "moved": moved}));
    }
    let mut s = if enter { format!("Node {} is in maintenance.\n", n.id) } else { format!("Node {} left maintenance.\n", n.id) };
    for m in moved {
        let line = match (m.failed, m.node.as_str()) {
            (true, _) => format!("  volume {}: NOT moved: {}\n", m.volume, m.note),
            (false, "") => format!("  volume {}: {}\n", m.volume, m.note),
            (false, to) => format!("  volume {}: now served by {to}\n", m.volume),
        };
        s.push_str(&line);
    }
    s
}

/// `credentials list` (no secrets: the engines never return them).
pub fn credentials(creds: &[pb::Credential], json: bool) -> String {
    if json {
        let rows: Vec<serde_json::Value> = creds
            .iter()
            .map(|c| json!({"name": c.name, "endpoint": c.endpoint, "bucket": c.bucket, "region": c.region, "access_key": c.access_key, "path_style": c.path_style, "encrypted": c.encrypted}))
            .collect();
        return doc(serde_json::Value::Array(rows));
    }
    let mut t = Table::new(&["NAME", "ENDPOINT", "BUCKET", "ACCESS KEY", "ENCRYPTED"]);
    for c in creds {
        t.row(vec![c.name.clone(), c.endpoint.clone(), c.bucket.clone(), c.access_key.clone(), if c.encrypted { "yes".into() } else { "no".into() }]);
    }
    t.render()
}

/// `cloudsnap status` and `cloudsnap backup`.
pub fn cloud_jobs(jobs: &[pb::CloudJob], json: bool) -> String {
    if json {
        let rows: Vec<serde_json::Value> = jobs
            .iter()
            .map(|j| {
                json!({"id": j.id, "volume": j.volume, "credential": j.credential, "node": j.node, "state": j.state, "error": j.error,
                            "done_extents": j.done_extents, "total_extents": j.total_extents, "uploaded_bytes": j.uploaded_bytes, "full": j.full})
            })
            .collect();
        return doc(serde_json::Value::Array(rows));
    }
    let mut t = Table::new(&["ID", "VOLUME", "STATE", "PROGRESS", "UPLOADED", "NODE", "ERROR"]);
    for j in jobs {
        let pct = (j.done_extents * 100).checked_div(j.total_extents).unwrap_or(100);
        t.row(vec![
            j.id.clone(),
            j.volume.clone(),
            j.state.clone(),
            format!("{pct}%"),
            format_size(j.uploaded_bytes),
            j.node.clone(),
            j.error.clone(),
        ]);
    }
    t.render()
}

/// `cloudsnap list`.
pub fn cloud_backups(backups: &[pb::CloudBackup], json: bool) -> String {
    if json {
        let rows: Vec<serde_json::Value> = backups
            .iter()
            .map(|b| json!({"id": b.id, "volume": b.volume, "cluster_id": b.cluster_id, "size_bytes": b.size_bytes, "created_unix": b.created_unix,
                            "parent": b.parent, "encrypted": b.encrypted, "extents": b.extents, "changed_extents": b.changed_extents, "uploaded_bytes": b.uploaded_bytes}))
            .collect();
        return doc(serde_json::Value::Array(rows));
    }
    let mut t = Table::new(&["ID", "VOLUME", "SIZE", "KIND", "CHANGED", "UPLOADED", "ENCRYPTED"]);
    for b in backups {
        let kind = if b.parent.is_empty() { "full".to_string() } else { format!("incremental of {}", b.parent) };
        t.row(vec![
            b.id.clone(),
            b.volume.clone(),
            format_size(b.size_bytes),
            kind,
            format!("{} extent(s)", b.changed_extents),
            format_size(b.uploaded_bytes),
            if b.encrypted { "yes".into() } else { "no".into() },
        ]);
    }
    t.render()
}

/// `cluster list`.
pub fn nodes(nodes: &[pb::Node], json: bool) -> String {
    if json {
        return doc(serde_json::Value::Array(nodes.iter().map(node_json).collect()));
    }
    nodes_table(nodes)
}

/// `volume usage`: per volume (or only `only`) its size, allocated bytes and snapshots, with
/// totals over the volumes shown.
pub fn volume_usage(all: &[pb::Volume], only: Option<&str>, json: bool) -> String {
    let vols: Vec<&pb::Volume> = all.iter().filter(|v| v.snapshot_of.is_empty() && only.is_none_or(|n| v.name == n)).collect();
    let snaps = |v: &pb::Volume| all.iter().filter(|s| s.snapshot_of == v.name).count();
    let size = |v: &pb::Volume| v.spec.as_ref().map_or(0, |s| s.size_bytes);
    let (total_size, total_used): (u64, u64) = vols.iter().fold((0, 0), |(a, b), v| (a + size(v), b + v.used_bytes));
    if json {
        let rows: Vec<serde_json::Value> = vols
            .iter()
            .map(|v| json!({"name": v.name, "size_bytes": size(v), "used_bytes": v.used_bytes, "snapshots": snaps(v), "replicas": v.replica_nodes}))
            .collect();
        return doc(json!({"volumes": rows, "total_size_bytes": total_size, "total_used_bytes": total_used}));
    }
    let pct = |used: u64, size: u64| if size == 0 { "-".to_string() } else { format!("{:.1}%", used as f64 * 100.0 / size as f64) };
    let mut t = Table::new(&["NAME", "SIZE", "USED", "USED%", "SNAPSHOTS", "REPLICAS"]);
    for v in &vols {
        t.row(vec![
            v.name.clone(),
            format_size(size(v)),
            format_size(v.used_bytes),
            pct(v.used_bytes, size(v)),
            snaps(v).to_string(),
            v.replica_nodes.join(","),
        ]);
    }
    if only.is_none() {
        t.row(vec!["TOTAL".into(), format_size(total_size), format_size(total_used), pct(total_used, total_size), String::new(), String::new()]);
    }
    t.render()
}

/// `volume list` (snapshots are left out by the caller).
pub fn volume_list(vols: &[pb::Volume], json: bool) -> String {
    if json {
        return doc(serde_json::Value::Array(vols.iter().map(volume_json).collect()));
    }
    let mut t = Table::new(&["ID", "NAME", "SIZE", "USED", "HA", "STATE", "CLIENTS", "LABELS"]);
    for v in vols {
        let spec = v.spec.clone().unwrap_or_default();
        t.row(vec![
            v.id.to_string(),
            v.name.clone(),
            format_size(spec.size_bytes),
            format_size(v.used_bytes),
            spec.repl.to_string(),
            v.state.clone(),
            v.connections.to_string(),
            labels_text(&spec.labels),
        ]);
    }
    t.render()
}

/// `volume inspect`.
pub fn volume_inspect(v: &pb::Volume, json: bool) -> String {
    if json {
        return doc(volume_json(v));
    }
    volume_fields(v)
}

/// A command that answers with one volume: its JSON, or the one-line `message`.
pub fn volume_done(v: &pb::Volume, json: bool, message: impl FnOnce(&pb::Volume) -> String) -> String {
    if json {
        return doc(volume_json(v));
    }
    format!("{}\n", message(v))
}

/// `volume delete` and `snapshot delete`: `message` is the text line.
pub fn deleted(name: &str, json: bool, message: &str) -> String {
    if json {
        return doc(json!({ "deleted": name }));
    }
    format!("{message}\n")
}

/// `volume snapshot list`.
pub fn snapshot_list(snaps: &[pb::Volume], json: bool) -> String {
    if json {
        return doc(serde_json::Value::Array(snaps.iter().map(volume_json).collect()));
    }
    let mut t = Table::new(&["ID", "NAME", "VOLUME", "SIZE", "CREATED", "NODES", "STATE", "LABELS"]);
    for v in snaps {
        let spec = v.spec.clone().unwrap_or_default();
        t.row(vec![
            v.id.to_string(),
            v.name.clone(),
            v.snapshot_of.clone(),
            format_size(spec.size_bytes),
            strata_api::schedule::format_unix(v.created_unix),
            v.in_sync_nodes.join(","),
            v.state.clone(),
            labels_text(&spec.labels),
        ]);
    }
    t.render()
}

/// `host attach` and `host detach`.
pub fn attachment(name: &str, v: &pb::Volume, json: bool) -> String {
    if json {
        return doc(volume_json(v));
    }
    if v.attached_node.is_empty() {
        format!("Volume {name} detached.\n")
    } else {
        format!("Volume {name} attached on node {} (epoch {}).\n", v.attached_node, v.epoch)
    }
}

/// `alerts show`: the output, and warnings for stderr (nodes whose alerts are missing).
pub fn alerts(r: &pb::ListAlertsResponse, json: bool) -> (String, Vec<String>) {
    if json {
        let v: Vec<_> = r
            .alerts
            .iter()
            .map(|a| {
                json!({"id": a.id, "node": a.node, "severity": a.severity, "kind": a.kind, "resource": a.resource,
                            "first_unix": a.first_unix, "last_unix": a.last_unix, "count": a.count, "message": a.message})
            })
            .collect();
        return (doc(json!({"alerts": v, "unreachable": r.unreachable})), Vec::new());
    }
    let out = if r.alerts.is_empty() {
        "No alerts.\n".to_string()
    } else {
        let mut t = Table::new(&["TIME", "NODE", "SEVERITY", "KIND", "RESOURCE", "COUNT", "MESSAGE"]);
        for a in &r.alerts {
            t.row(vec![
                strata_api::schedule::format_unix(a.last_unix),
                a.node.clone(),
                a.severity.clone(),
                a.kind.clone(),
                a.resource.clone(),
                a.count.to_string(),
                a.message.clone(),
            ]);
        }
        t.render()
    };
    (out, r.unreachable.iter().map(|u| format!("warning: alerts of node {u} are missing")).collect())
}

/// `service pool show`.
pub fn pools(pools: &[pb::Pool], json: bool) -> String {
    if json {
        let v: Vec<_> = pools
            .iter()
            .map(|p| {
                json!({
                    "uuid": p.uuid, "extent_size": p.extent_size, "total_bytes": p.total_bytes, "used_bytes": p.used_bytes,
                    "devices": p.devices.iter().map(|d| json!({
                        "uuid": d.uuid, "path": d.path, "size_bytes": d.size_bytes, "total_extents": d.total_extents,
                        "free_extents": d.free_extents, "kind": d.kind, "io_engine": d.io_engine, "direct_io": d.direct_io,
                        "failed": d.failed, "io_errors": d.io_errors,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        return doc(serde_json::Value::Array(v));
    }
    let mut out = String::new();
    for p in pools {
        out += &format!(
            "Pool {}: {} used of {}, extent size {}\n",
            p.uuid,
            format_size(p.used_bytes),
            format_size(p.total_bytes),
            format_size(p.extent_size)
        );
        let mut t = Table::new(&["DEVICE", "KIND", "SIZE", "EXTENTS", "FREE", "STATE", "IO", "O_DIRECT", "UUID"]);
        for d in &p.devices {
            let state = match (d.failed, d.io_errors) {
                (false, _) => "ok".to_string(),
                (true, 0) => "failed (journal)".to_string(),
                (true, n) => format!("failed ({n} I/O errors)"),
            };
            t.row(vec![
                d.path.clone(),
                d.kind.clone(),
                format_size(d.size_bytes),
                d.total_extents.to_string(),
                d.free_extents.to_string(),
                state,
                d.io_engine.clone(),
                if d.direct_io { "yes".into() } else { "no".into() },
                d.uuid.clone(),
            ]);
        }
        out += &t.render();
    }
    out
}

#[cfg(test)]
mod tests {

    #[test]
    fn alerts_by_kind_and_age() {
        let a = |kind: &str, last: u64| pb::Alert { kind: kind.into(), last_unix: last, ..Default::default() };
        let all = vec![a("NodeOffline", 100), a("PoolNearFull", 200), a("NodeOnline", 300)];
        let kinds = |k: &[&str]| k.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let names = |v: &[pb::Alert]| v.iter().map(|a| a.kind.clone()).collect::<Vec<_>>();
        let mut v = all.clone();
        keep_alerts(&mut v, &kinds(&["nodeoffline", "NodeOnline"]), 0);
        assert_eq!(names(&v), ["NodeOffline", "NodeOnline"]);
        let mut v = all.clone();
        keep_alerts(&mut v, &[], 200);
        assert_eq!(names(&v), ["PoolNearFull", "NodeOnline"]);
        let mut v = all;
        keep_alerts(&mut v, &kinds(&["NodeOffline"]), 200);
        assert!(v.is_empty());
    }

    #[test]
    fn ha_update_says_what_it_added_or_removed() {
        let v = |nodes: &[&str]| pb::Volume {
            name: "db".into(),
            replica_nodes: nodes.iter().map(|n| n.to_string()).collect(),
            in_sync_nodes: vec!["a".into()],
            ..Default::default()
        };
        let before = ["a".to_string(), "b".to_string()];
        let t = ha_update_text(&v(&["a"]), &before);
        assert!(t.contains("removed the replica on b") && !t.contains("background"), "{t}");
        let t = ha_update_text(&v(&["a", "b", "c"]), &before);
        assert!(t.contains("added a replica on c") && t.contains("background"), "{t}");
        assert!(ha_update_text(&v(&["a", "b"]), &before).contains("no change"));
    }

    use super::*;

    fn vol(name: &str) -> pb::Volume {
        pb::Volume {
            id: 7,
            name: name.into(),
            spec: Some(pb::VolumeSpec {
                size_bytes: 10 << 20,
                repl: 2,
                labels: [("tier".to_string(), "gold".to_string()), ("app".to_string(), "db".to_string())].into(),
                qos: Some(pb::QosLimits { rd_iops: 100, wr_bw: 1 << 20, ..Default::default() }),
                ..Default::default()
            }),
            state: "degraded".into(),
            attached_node: "n1".into(),
            epoch: 4,
            replica_nodes: vec!["n1".into(), "n2".into()],
            in_sync_nodes: vec!["n1".into()],
            replica_status: vec![pb::ReplicaStatus { node: "n2".into(), state: "resyncing".into(), dirty_bytes: 1 << 20, copied_bytes: 0 }],
            ..Default::default()
        }
    }

    #[test]
    fn a_volume_list_lines_up_and_sorts_labels() {
        let out = volume_list(&[vol("a"), vol("bbbbbbbb")], false);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        let col = lines[0].find("SIZE").unwrap();
        assert!(lines[1..].iter().all(|l| l[col..].starts_with("10 MiB")), "{out}");
        assert!(out.contains("app=db,tier=gold") && out.contains("degraded"), "{out}");
    }

    #[test]
    fn inspect_names_every_field_and_each_replicas_progress() {
        let out = volume_inspect(&vol("a"), false);
        for want in
            ["Attached on", "n1", "Epoch", "4", "In sync", "read 100 IOPS, write 1 MiB/s", "Replica n2", "resyncing (1 MiB to copy, 0 B copied)"]
        {
            assert!(out.contains(want), "{want:?} missing in\n{out}");
        }
        let mut detached = vol("a");
        detached.attached_node.clear();
        detached.spec.as_mut().unwrap().qos = None;
        let out = volume_inspect(&detached, false);
        assert!(out.contains("(detached)") && out.contains("unlimited"), "{out}");
    }

    #[test]
    fn json_is_one_document_with_the_fields_scripts_read() {
        let v: serde_json::Value = serde_json::from_str(&volume_inspect(&vol("a"), true)).unwrap();
        assert_eq!((v["name"].as_str(), v["size_bytes"].as_u64(), v["repl"].as_u64()), (Some("a"), Some(10 << 20), Some(2)));
        assert_eq!(v["replica_status"][0]["state"], "resyncing");
        assert!(v["snapshot_of"].is_null(), "only snapshots name their volume");
        let list: serde_json::Value = serde_json::from_str(&volume_list(&[vol("a"), vol("b")], true)).unwrap();
        assert_eq!(list.as_array().map(|a| a.len()), Some(2));
        assert_eq!(serde_json::from_str::<serde_json::Value>(&deleted("x", true, "gone")).unwrap()["deleted"], "x");
    }

    #[test]
    fn messages_say_what_happened() {
        assert_eq!(deleted("x", false, "Snapshot x deleted."), "Snapshot x deleted.\n");
        assert_eq!(attachment("v", &vol("v"), false), "Volume v attached on node n1 (epoch 4).\n");
        let mut d = vol("v");
        d.attached_node.clear();
        assert_eq!(attachment("v", &d, false), "Volume v detached.\n");
        assert_eq!(volume_done(&vol("v"), false, |v| format!("done {}", v.name)), "done v\n");
    }

    #[test]
    fn status_shows_capacity_and_every_node() {
        let s = pb::ClusterStatusResponse {
            status: "ok".into(),
            cluster_id: "c1".into(),
            total_bytes: 3 << 30,
            used_bytes: 16 << 20,
            volume_count: 2,
            nodes: vec![
                pb::Node { id: "n1".into(), status: "online".into(), ..Default::default() },
                pb::Node { id: "n2".into(), status: "offline".into(), ..Default::default() },
            ],
            ..Default::default()
        };
        let out = status(&s, false);
        assert!(out.starts_with("Status: ok\n") && out.contains("Capacity: 16 MiB used of 3 GiB") && out.contains("Volumes: 2"), "{out}");
        assert!(out.contains("n1") && out.contains("offline"), "{out}");
        let j: serde_json::Value = serde_json::from_str(&status(&s, true)).unwrap();
        assert_eq!(j["nodes"][1]["status"], "offline");
    }

    #[test]
    fn alerts_warn_about_nodes_that_did_not_answer() {
        let r = pb::ListAlertsResponse { alerts: vec![], unreachable: vec!["n3".into()] };
        let (out, warn) = alerts(&r, false);
        assert_eq!(out, "No alerts.\n");
        assert_eq!(warn, ["warning: alerts of node n3 are missing"]);
        let (j, warn) = alerts(&r, true);
        assert!(warn.is_empty());
        assert_eq!(serde_json::from_str::<serde_json::Value>(&j).unwrap()["unreachable"][0], "n3");
    }
}
