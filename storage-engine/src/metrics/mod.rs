//! The engine's metrics (per-volume I/O, pool capacity) in the OpenMetrics exposition of
//! `prometheus-client`. Counters are atomics bumped
//! on the data path; rendering walks them on scrape.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
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

    /// Observations so far and the sum of their microseconds.
    pub fn totals(&self) -> (u64, u64) {
        (self.count.load(Relaxed), self.sum_us.load(Relaxed))
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
    /// Replicas, replicas in sync and bytes they miss, for a volume this node serves.
    pub replicas: Option<[u64; 3]>,
}

#[derive(Debug, Clone)]
pub struct PoolSample {
    pub uuid: String,
    pub total: u64,
    pub used: u64,
    /// Extents whose checksums on disk may be behind their data (written to disk within
    /// seconds).
    pub unsettled: u64,
    /// Drives of the pool that failed (journal or data I/O).
    pub failed_drives: u64,
}

/// The values of one scrape, copied out of the atomics.
#[derive(Debug)]
struct Scrape {
    pool: PoolSample,
    volumes: Vec<VolumeValues>,
}

#[derive(Debug)]
struct VolumeValues {
    name: String,
    gauges: [u64; 3],
    counters: [u64; 7],
    latency: [HistogramValues; 2],
    replicas: Option<[u64; 3]>,
}

#[derive(Debug)]
struct HistogramValues {
    sum: f64,
    count: u64,
    /// Per-bucket counts (not cumulative), the last one `+Inf`.
    buckets: Vec<(f64, u64)>,
}

impl Histogram {
    fn values(&self) -> HistogramValues {
        let count = self.count.load(Relaxed);
        let mut buckets: Vec<(f64, u64)> = BUCKETS_US.iter().zip(&self.buckets).map(|(b, n)| (*b as f64 / 1e6, n.load(Relaxed))).collect();
        let counted: u64 = buckets.iter().map(|(_, n)| n).sum();
        buckets.push((f64::MAX, count.saturating_sub(counted)));
        HistogramValues { sum: self.sum_us.load(Relaxed) as f64 / 1e6, count, buckets }
    }
}

const POOL_GAUGES: [(&str, &str); 4] = [
    ("strata_pool_capacity_bytes", "Usable data capacity of the pool."),
    ("strata_pool_used_bytes", "Bytes of extents allocated to volumes."),
    ("strata_pool_unsettled_extents", "Extents whose block checksums on disk may be behind their data."),
    ("strata_pool_drives_failed", "Drives of the pool that failed (journal writes or data I/O)."),
];
const VOLUME_GAUGES: [(&str, &str); 3] = [
    ("strata_volume_size_bytes", "Provisioned size of the volume."),
    ("strata_volume_used_bytes", "Pool bytes allocated to the volume."),
    ("strata_volume_connections", "NBD clients connected to the volume."),
];
/// Counter names without the `_total` the exposition adds.
const VOLUME_COUNTERS: [(&str, &str); 7] = [
    ("strata_volume_read_ops", "Read requests served."),
    ("strata_volume_write_ops", "Write requests served (writes and write-zeroes)."),
    ("strata_volume_read_bytes", "Bytes read."),
    ("strata_volume_write_bytes", "Bytes written."),
    ("strata_volume_flush_ops", "Flush requests served."),
    ("strata_volume_trim_ops", "Trim requests served."),
    ("strata_volume_errors", "Requests answered with an error."),
];
/// Reported by the volume's target only.
const REPLICA_GAUGES: [(&str, &str); 3] = [
    ("strata_volume_replicas", "Replicas of the volume."),
    ("strata_volume_replicas_in_sync", "Replicas holding every acknowledged write (fewer than strata_volume_replicas: degraded)."),
    ("strata_volume_resync_missed_bytes", "Bytes the out-of-sync replicas miss (what resync has left to copy)."),
];
const VOLUME_HISTOGRAMS: [(&str, &str); 2] =
    [("strata_volume_read_latency_seconds", "Read latency."), ("strata_volume_write_latency_seconds", "Write latency.")];

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let pool = [("pool", self.pool.uuid.as_str())];
        for ((name, help), v) in POOL_GAUGES.iter().zip([self.pool.total, self.pool.used, self.pool.unsettled, self.pool.failed_drives]) {
            enc.encode_descriptor(name, help, None, MetricType::Gauge)?.encode_family(&pool)?.encode_gauge(&v)?;
        }
        for (i, (name, help)) in VOLUME_GAUGES.iter().enumerate() {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for v in &self.volumes {
                m.encode_family(&[("volume", v.name.as_str())])?.encode_gauge(&v.gauges[i])?;
            }
        }
        for (i, (name, help)) in VOLUME_COUNTERS.iter().enumerate() {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for v in &self.volumes {
                m.encode_family(&[("volume", v.name.as_str())])?.encode_counter::<NoLabelSet, u64, u64>(&v.counters[i], None)?;
            }
        }
        for (i, (name, help)) in REPLICA_GAUGES.iter().enumerate() {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for v in &self.volumes {
                if let Some(r) = v.replicas {
                    m.encode_family(&[("volume", v.name.as_str())])?.encode_gauge(&r[i])?;
                }
            }
        }
        for (i, (name, help)) in VOLUME_HISTOGRAMS.iter().enumerate() {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
            for v in &self.volumes {
                let h = &v.latency[i];
                m.encode_family(&[("volume", v.name.as_str())])?.encode_histogram::<NoLabelSet>(h.sum, h.count, &h.buckets, None)?;
            }
        }
        Ok(())
    }
}

/// The engine's exposition (OpenMetrics text, `strata_api::metrics::CONTENT_TYPE`).
pub fn render(pool: &PoolSample, volumes: &[VolumeSample<'_>]) -> String {
    let volumes = volumes
        .iter()
        .map(|v| {
            let s = v.stats;
            VolumeValues {
                name: v.name.to_string(),
                gauges: [v.size, v.used, v.connections as u64],
                counters: [&s.read_ops, &s.write_ops, &s.read_bytes, &s.write_bytes, &s.flush_ops, &s.trim_ops, &s.errors].map(|c| c.load(Relaxed)),
                latency: [s.read_latency.values(), s.write_latency.values()],
                replicas: v.replicas,
            }
        })
        .collect();
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape { pool: pool.clone(), volumes }));
    strata_api::metrics::encode(&registry)
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
            &PoolSample { uuid: "p".into(), total: 100, used: 10, unsettled: 0, failed_drives: 0 },
            &[
                VolumeSample { name: "v1", size: 5, used: 1, connections: 2, stats: &s, replicas: Some([3, 2, 4096]) },
                VolumeSample { name: "v2", size: 5, used: 1, connections: 0, stats: &s, replicas: None },
            ],
        );
        assert!(text.contains("strata_volume_replicas{volume=\"v1\"} 3"), "{text}");
        assert!(text.contains("strata_volume_replicas_in_sync{volume=\"v1\"} 2"));
        assert!(text.contains("strata_volume_resync_missed_bytes{volume=\"v1\"} 4096"));
        assert!(!text.contains("strata_volume_replicas{volume=\"v2\"}"), "only the target reports replicas");
        assert!(text.contains("strata_pool_capacity_bytes{pool=\"p\"} 100"));
        assert!(text.contains("strata_volume_read_ops_total{volume=\"v1\"} 3"));
        assert!(text.contains("strata_volume_read_latency_seconds_bucket{le=\"0.0001\",volume=\"v1\"} 1"), "{text}");
        assert!(text.contains("strata_volume_read_latency_seconds_bucket{le=\"0.005\",volume=\"v1\"} 2"));
        assert!(text.contains("strata_volume_read_latency_seconds_count{volume=\"v1\"} 2"));
        assert!(text.contains("strata_volume_connections{volume=\"v1\"} 2"));
        assert!(text.contains("strata_volume_read_latency_seconds_bucket{le=\"+Inf\",volume=\"v1\"} 2"));
        assert!(text.contains("# TYPE strata_volume_read_ops counter"));
        assert!(text.ends_with("# EOF\n"));
    }
}
