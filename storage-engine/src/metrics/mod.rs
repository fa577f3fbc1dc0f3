//! Prometheus text exposition for per-volume I/O and pool capacity. Counters are atomics bumped
//! on the data path; rendering walks them on scrape.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Latency bucket upper bounds, microseconds.
const BUCKETS_US: [u64; 12] = [50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 1_000_000];

#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS_US.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let us = d.as_micros() as u64;
        if let Some(i) = BUCKETS_US.iter().position(|b| us <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cum = 0;
        for (i, b) in BUCKETS_US.iter().enumerate() {
            cum += self.buckets[i].load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{}\"}} {cum}", *b as f64 / 1e6);
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum_us.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// One volume's I/O counters.
#[derive(Default)]
pub struct VolumeStats {
    pub read_ops: AtomicU64,
    pub write_ops: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub flush_ops: AtomicU64,
    pub trim_ops: AtomicU64,
    pub errors: AtomicU64,
    pub read_latency: Histogram,
    pub write_latency: Histogram,
}

/// What the exposition needs of one volume.
pub struct VolumeSample<'a> {
    pub name: &'a str,
    pub size: u64,
    pub used: u64,
    pub connections: u32,
    pub stats: &'a VolumeStats,
}

pub struct PoolSample {
    pub uuid: String,
    pub total: u64,
    pub used: u64,
    /// Extents whose checksums on disk may be behind their data (written to disk within
    /// seconds).
    pub unsettled: u64,
}

type Gauge = (&'static str, &'static str, fn(&VolumeSample) -> u64);
type Counter = (&'static str, &'static str, fn(&VolumeStats) -> &AtomicU64);

pub fn render(pool: &PoolSample, volumes: &[VolumeSample<'_>]) -> String {
    let mut o = String::new();
    let p = format!("pool=\"{}\"", pool.uuid);
    let _ = writeln!(o, "# HELP strata_pool_capacity_bytes Usable data capacity of the pool.\n# TYPE strata_pool_capacity_bytes gauge");
    let _ = writeln!(o, "strata_pool_capacity_bytes{{{p}}} {}", pool.total);
    let _ = writeln!(o, "# HELP strata_pool_used_bytes Bytes of extents allocated to volumes.\n# TYPE strata_pool_used_bytes gauge");
    let _ = writeln!(o, "strata_pool_used_bytes{{{p}}} {}", pool.used);
    let _ = writeln!(o, "# HELP strata_pool_unsettled_extents Extents whose block checksums on disk may be behind their data.\n# TYPE strata_pool_unsettled_extents gauge");
    let _ = writeln!(o, "strata_pool_unsettled_extents{{{p}}} {}", pool.unsettled);
    let gauges: [Gauge; 3] = [
        ("strata_volume_size_bytes", "Provisioned size of the volume.", |v| v.size),
        ("strata_volume_used_bytes", "Pool bytes allocated to the volume.", |v| v.used),
        ("strata_volume_connections", "NBD clients connected to the volume.", |v| v.connections as u64),
    ];
    for (name, help, f) in gauges {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge");
        for v in volumes {
            let _ = writeln!(o, "{name}{{volume=\"{}\"}} {}", v.name, f(v));
        }
    }
    let counters: [Counter; 7] = [
        ("strata_volume_read_ops_total", "Read requests served.", |s| &s.read_ops),
        ("strata_volume_write_ops_total", "Write requests served (writes and write-zeroes).", |s| &s.write_ops),
        ("strata_volume_read_bytes_total", "Bytes read.", |s| &s.read_bytes),
        ("strata_volume_write_bytes_total", "Bytes written.", |s| &s.write_bytes),
        ("strata_volume_flush_ops_total", "Flush requests served.", |s| &s.flush_ops),
        ("strata_volume_trim_ops_total", "Trim requests served.", |s| &s.trim_ops),
        ("strata_volume_errors_total", "Requests answered with an error.", |s| &s.errors),
    ];
    for (name, help, f) in counters {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
        for v in volumes {
            let _ = writeln!(o, "{name}{{volume=\"{}\"}} {}", v.name, f(v.stats).load(Relaxed));
        }
    }
    for (name, help, f) in [
        ("strata_volume_read_latency_seconds", "Read latency.", (|s: &VolumeStats| &s.read_latency) as fn(&VolumeStats) -> &Histogram),
        ("strata_volume_write_latency_seconds", "Write latency.", |s: &VolumeStats| &s.write_latency),
    ] {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} histogram");
        for v in volumes {
            f(v.stats).render(&mut o, name, &format!("volume=\"{}\"", v.name));
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_counters_and_cumulative_buckets() {
        let s = VolumeStats::default();
        s.read_ops.fetch_add(3, Relaxed);
        s.read_latency.observe(Duration::from_micros(80));
        s.read_latency.observe(Duration::from_micros(3000));
        let text = render(
            &PoolSample { uuid: "p".into(), total: 100, used: 10, unsettled: 0 },
            &[VolumeSample { name: "v1", size: 5, used: 1, connections: 2, stats: &s }],
        );
        assert!(text.contains("strata_pool_capacity_bytes{pool=\"p\"} 100"));
        assert!(text.contains("strata_volume_read_ops_total{volume=\"v1\"} 3"));
        assert!(text.contains("strata_volume_read_latency_seconds_bucket{volume=\"v1\",le=\"0.0001\"} 1"));
        assert!(text.contains("strata_volume_read_latency_seconds_bucket{volume=\"v1\",le=\"0.005\"} 2"));
        assert!(text.contains("strata_volume_read_latency_seconds_count{volume=\"v1\"} 2"));
        assert!(text.contains("strata_volume_connections{volume=\"v1\"} 2"));
    }
}
