//! `stratactl volume inspect --watch`: follows a volume's resync until every replica is in sync.
//! On a terminal each replica catching up gets a progress bar (indicatif); otherwise each look
//! prints a line per replica (or, with --json, one JSON object), so scripts and logs see it too.

use crate::{render, status_err, Sdk};
use anyhow::{anyhow, bail};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};
use strata_api::v1 as pb;

/// Copied and total bytes of a replica's resync (total 0 while nothing is known yet).
pub fn progress(r: &pb::ReplicaStatus) -> (u64, u64) {
    (r.copied_bytes, r.copied_bytes + r.dirty_bytes)
}

/// Whether every replica of the volume is in sync.
pub fn settled(v: &pb::Volume) -> bool {
    v.replica_nodes.iter().all(|n| v.in_sync_nodes.contains(n))
}

/// Looks at the volume every `interval` until it is settled (or `timeout`, if not zero, passes);
/// returns it as last seen.
pub async fn resync(
    c: &mut pb::volume_service_client::VolumeServiceClient<Sdk>,
    name: &str,
    json: bool,
    interval: Duration,
    timeout: Duration,
) -> anyhow::Result<pb::Volume> {
    let tty = std::io::stdout().is_terminal() && !json;
    let bars = indicatif::MultiProgress::new();
    let mut by_node: HashMap<String, indicatif::ProgressBar> = HashMap::new();
    let style = indicatif::ProgressStyle::with_template("{prefix:>12} [{bar:40}] {bytes}/{total_bytes} {msg}")
        .expect("a valid template")
        .progress_chars("=> ");
    let t0 = Instant::now();
    loop {
        let v = c.inspect(pb::InspectVolumeRequest { name: name.to_string() }).await.map_err(status_err)?.into_inner();
        let v = v.volume.ok_or_else(|| anyhow!("engine returned no volume"))?;
        let done = settled(&v);
        for r in v.replica_status.iter().filter(|r| !v.in_sync_nodes.contains(&r.node)) {
            let (copied, total) = progress(r);
            if tty {
                let b = by_node.entry(r.node.clone()).or_insert_with(|| {
                    let b = bars.add(indicatif::ProgressBar::new(total));
                    b.set_style(style.clone());
                    b.set_prefix(r.node.clone());
                    b
                });
                b.set_length(total);
                b.set_position(copied);
                b.set_message(r.state.clone());
            } else if !json {
                println!("{}", render::resync_line(r));
            }
        }
        if json {
            println!("{}", serde_json::to_string(&render::resync_json(&v)).expect("plain data"));
        }
        if done {
            for b in by_node.values() {
                b.finish_with_message("in sync");
            }
            return Ok(v);
        }
        if !timeout.is_zero() && t0.elapsed() >= timeout {
            bail!("volume {name} still has replicas out of sync after {}s (in sync: {})", timeout.as_secs(), v.in_sync_nodes.join(","));
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_and_settled() {
        let r = pb::ReplicaStatus { node: "n2".into(), state: "resyncing".into(), dirty_bytes: 3 << 20, copied_bytes: 1 << 20 };
        assert_eq!(progress(&r), (1 << 20, 4 << 20));
        let mut v = pb::Volume { replica_nodes: vec!["n1".into(), "n2".into()], in_sync_nodes: vec!["n1".into()], ..Default::default() };
        assert!(!settled(&v));
        v.in_sync_nodes.push("n2".into());
        assert!(settled(&v));
    }
}
