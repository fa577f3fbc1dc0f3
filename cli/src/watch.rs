//! Commands that look at a volume again and again: `volume inspect --watch` follows a resync until
//! every replica is in sync (on a terminal a progress bar per replica catching up, indicatif;
//! otherwise a line per replica per look, or with --json one JSON object), and `volume stats`
//! prints the client I/O rates over each interval.

use crate::{inspect_volume, render, Sdk};
use anyhow::bail;
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

/// What `resync` shows of each look.
#[derive(Clone, Copy, PartialEq)]
pub enum Report {
    /// A progress bar per replica on a terminal, else a line per replica per look.
    Lines,
    /// A JSON object per look.
    Json,
    /// Progress bars on a terminal, else nothing.
    Terminal,
}

/// Looks at the volume every `interval` until it is settled (or `timeout`, if not zero, passes);
/// returns it as last seen.
pub async fn resync(
    c: &mut pb::volume_service_client::VolumeServiceClient<Sdk>,
    name: &str,
    report: Report,
    interval: Duration,
    timeout: Duration,
) -> anyhow::Result<pb::Volume> {
    let json = report == Report::Json;
    let lines = report == Report::Lines;
    let tty = std::io::stdout().is_terminal() && !json;
    let bars = indicatif::MultiProgress::new();
    let mut by_node: HashMap<String, indicatif::ProgressBar> = HashMap::new();
    let style = indicatif::ProgressStyle::with_template("{prefix:>12} [{bar:40}] {bytes}/{total_bytes} {msg}")
        .expect("a valid template")
        .progress_chars("=> ");
    let t0 = Instant::now();
    loop {
        let v = inspect_volume(c, name).await?;
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
            } else if lines {
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

/// The rates between two readings of a volume's counters `secs` apart.
pub fn rates(a: &pb::IoStats, b: &pb::IoStats, secs: f64) -> serde_json::Value {
    let d = |x: u64, y: u64| y.saturating_sub(x);
    let (r, w) = (d(a.read_ops, b.read_ops), d(a.write_ops, b.write_ops));
    let mean_ms = |us: u64, ops: u64| if ops == 0 { 0.0 } else { us as f64 / ops as f64 / 1000.0 };
    serde_json::json!({
        "read_iops": r as f64 / secs,
        "write_iops": w as f64 / secs,
        "read_mib_s": d(a.read_bytes, b.read_bytes) as f64 / secs / (1 << 20) as f64,
        "write_mib_s": d(a.write_bytes, b.write_bytes) as f64 / secs / (1 << 20) as f64,
        "read_latency_ms": mean_ms(d(a.read_latency_us, b.read_latency_us), r),
        "write_latency_ms": mean_ms(d(a.write_latency_us, b.write_latency_us), w),
        "flushes": d(a.flush_ops, b.flush_ops),
        "errors": d(a.errors, b.errors),
    })
}

/// `volume stats`: a row (or JSON object) of rates per `interval`, `count` times (0: for ever).
pub async fn stats(
    c: &mut pb::volume_service_client::VolumeServiceClient<Sdk>,
    name: &str,
    json: bool,
    interval: Duration,
    count: u64,
) -> anyhow::Result<()> {
    let look = || {
        let mut c = c.clone();
        let name = name.to_string();
        async move {
            let v = inspect_volume(&mut c, &name).await?;
            if v.attached_node.is_empty() {
                bail!("volume {name} is not attached: no node serves its I/O (stratactl host attach {name})");
            }
            Ok::<_, anyhow::Error>((v.io_stats.unwrap_or_default(), Instant::now()))
        }
    };
    let (mut prev, mut at) = look().await?;
    if !json {
        println!("{:>10} {:>10} {:>10} {:>10} {:>10} {:>10}", "r/s", "w/s", "rMiB/s", "wMiB/s", "r_ms", "w_ms");
    }
    let mut shown = 0;
    while count == 0 || shown < count {
        tokio::time::sleep(interval).await;
        let (now, t) = look().await?;
        let r = rates(&prev, &now, t.duration_since(at).as_secs_f64());
        if json {
            println!("{r}");
        } else {
            let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
            println!(
                "{:>10.0} {:>10.0} {:>10.1} {:>10.1} {:>10.2} {:>10.2}",
                f("read_iops"),
                f("write_iops"),
                f("read_mib_s"),
                f("write_mib_s"),
                f("read_latency_ms"),
                f("write_latency_ms")
            );
        }
        (prev, at) = (now, t);
        shown += 1;
    }
    Ok(())
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

    #[test]
    fn rates_over_an_interval() {
        let a = pb::IoStats { write_ops: 100, write_bytes: 100 << 12, write_latency_us: 10_000, ..Default::default() };
        let b = pb::IoStats { write_ops: 300, write_bytes: 300 << 12, write_latency_us: 50_000, read_ops: 10, ..Default::default() };
        let r = rates(&a, &b, 2.0);
        assert_eq!(r["write_iops"], 100.0);
        assert_eq!(r["read_iops"], 5.0);
        assert_eq!(r["write_latency_ms"], 0.2, "40 ms over 200 writes");
        assert_eq!(r["read_latency_ms"], 0.0);
        assert!((r["write_mib_s"].as_f64().unwrap() - 200.0 * 4096.0 / 2.0 / 1048576.0).abs() < 1e-9);
    }
}
