//! `service maintenance --enter|--exit` and `cluster delete NODE` (decommission).
//!
//! Decommission is driven from here, one volume at a time, with calls any user of the SDK
//! could make: a new replica is added elsewhere (`ha-update`, placed by the engine) and rebuilt,
//! then the node's replica is removed; the engine removes the node only once nothing is left
//! on it. Interrupted, the command can be run again: volumes already moved are skipped, and a
//! replica already added is waited for instead of added twice.

use crate::{fail, inspect_volume, render, status_err, Sdk};
use anyhow::anyhow;
use std::time::{Duration, Instant};
use strata_api::v1 as pb;

type Volumes = pb::volume_service_client::VolumeServiceClient<Sdk>;

pub async fn maintenance(ch: Sdk, node: Option<String>, enter: bool, json: bool) -> anyhow::Result<()> {
    let req = pb::MaintenanceRequest { node: node.unwrap_or_default(), enter, reason: String::new() };
    let r = pb::node_service_client::NodeServiceClient::new(ch).maintenance(req).await.map_err(status_err)?.into_inner();
    let n = r.node.unwrap_or_default();
    print!("{}", render::maintenance(&n, &r.moved, enter, json));
    let failed: Vec<&str> = r.moved.iter().filter(|m| m.failed).map(|m| m.volume.as_str()).collect();
    if !failed.is_empty() {
        return Err(fail(
            "failed_precondition",
            format!("node {} is in maintenance, but volume(s) {} did not move (see above)", n.id, failed.join(", ")),
        ));
    }
    Ok(())
}

/// Whether every replica but the one on `leaving` is in sync.
fn others_in_sync(v: &pb::Volume, leaving: &str) -> bool {
    v.replica_nodes.iter().filter(|n| *n != leaving).all(|n| v.in_sync_nodes.contains(n))
}

async fn wait_in_sync(c: &mut Volumes, name: &str, leaving: &str, timeout: Duration) -> anyhow::Result<pb::Volume> {
    let t0 = Instant::now();
    loop {
        let v = inspect_volume(c, name).await?;
        if others_in_sync(&v, leaving) {
            return Ok(v);
        }
        if t0.elapsed() >= timeout {
            return Err(fail(
                "timeout",
                format!(
                    "volume {name}: its new replica is not in sync after {}s (in sync: {}); run the command again to go on waiting",
                    timeout.as_secs(),
                    v.in_sync_nodes.join(",")
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn ha_update(c: &mut Volumes, name: &str, repl: u32, node: &str) -> anyhow::Result<pb::Volume> {
    let req = pb::HaUpdateRequest { name: name.to_string(), repl, node: node.to_string() };
    c.ha_update(req).await.map_err(status_err)?.into_inner().volume.ok_or_else(|| anyhow!("engine returned no volume"))
}

/// Moves volume `name`'s replica (and its target) off `node`; returns what was done.
async fn move_off(c: &mut Volumes, name: &str, node: &str, timeout: Duration) -> anyhow::Result<String> {
    let v = inspect_volume(c, name).await?;
    let detached = v.attached_node.is_empty();
    if v.attached_node == node {
        // Served by the leaving node, which is offline (maintenance would have moved it): this
        // node takes it over.
        let req = pb::AttachVolumeRequest { name: name.to_string(), force: false, passphrase: Vec::new() };
        c.attach(req).await.map_err(status_err)?;
    }
    if !v.replica_nodes.iter().any(|n| n == node) {
        return Ok(format!("volume {name}: target moved off {node}"));
    }
    let repl = v.spec.as_ref().map_or(1, |s| s.repl);
    let before = v.replica_nodes.clone();
    let v = if v.replica_nodes.len() as u32 > repl {
        // A replica added by an interrupted run: wait for it, then drop the node's.
        wait_in_sync(c, name, node, timeout).await?;
        ha_update(c, name, repl, node).await?
    } else if repl < MAX_REPL {
        ha_update(c, name, repl + 1, "").await?;
        wait_in_sync(c, name, node, timeout).await?;
        ha_update(c, name, repl, node).await?
    } else {
        // No room for a replica more: the node's goes first, then a new one is rebuilt.
        ha_update(c, name, repl - 1, node).await?;
        ha_update(c, name, repl, "").await?;
        wait_in_sync(c, name, node, timeout).await?
    };
    if detached {
        let req = pb::DetachVolumeRequest { name: name.to_string(), force: false };
        c.detach(req).await.map_err(status_err)?;
    }
    let added: Vec<&String> = v.replica_nodes.iter().filter(|n| !before.contains(n)).collect();
    Ok(format!("volume {name}: replica moved from {node} to {}", added.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(",")))
}

const MAX_REPL: u32 = 3;

pub async fn decommission(ch: Sdk, node: String, timeout: Duration, json: bool) -> anyhow::Result<()> {
    let mut nodes = pb::node_service_client::NodeServiceClient::new(ch.clone());
    let ask = |dry_run| pb::DecommissionRequest { node: node.clone(), dry_run };
    let plan = nodes.decommission(ask(true)).await.map_err(status_err)?.into_inner();
    if !plan.blockers.is_empty() {
        return Err(fail("failed_precondition", format!("node {node} cannot be removed; nothing was changed:\n  {}", plan.blockers.join("\n  "))));
    }
    let mut c = Volumes::new(ch);
    let mut done = Vec::new();
    for name in &plan.to_move {
        let what = move_off(&mut c, name, &node, timeout).await.map_err(|e| anyhow!("{e:#} (moved so far: {})", done.len()))?;
        if !json {
            println!("{what}");
        }
        done.push(what);
    }
    nodes.decommission(ask(false)).await.map_err(status_err)?;
    if json {
        print!("{}", render::doc(serde_json::json!({"removed": node, "moved": done})));
    } else {
        println!("Node {node} removed from the cluster.");
    }
    Ok(())
}
