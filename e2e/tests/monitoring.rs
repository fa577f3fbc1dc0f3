//! The chart's monitoring (charts/strata: the PrometheusRule template and the Grafana dashboard)
//! queries only series a real engine serves: every `strata_*` name in them is in the `/metrics`
//! of the target of a replicated volume with a replica down, where the replica gauges say so.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;
use strata_e2e::cluster::Cluster;
use strata_e2e::nbd::Client;
use strata_e2e::scrape;

fn chart() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/strata")
}

/// The `strata_*` series names in `text`.
fn series(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("strata_") {
        let start = i + at;
        let end = start + b[start..].iter().take_while(|c| c.is_ascii_lowercase() || **c == b'_').count();
        if start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_') {
            out.insert(text[start..end].to_string());
        }
        i = end;
    }
    out
}

#[test]
fn the_charts_alerts_and_dashboard_query_series_the_engine_serves() {
    let rule = std::fs::read_to_string(chart().join("templates/prometheusrule.yaml")).unwrap();
    let dashboard = std::fs::read_to_string(chart().join("dashboards/strata.json")).unwrap();
    let d: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    assert!(d["panels"].as_array().is_some_and(|p| p.len() >= 6), "cluster capacity, IOPS, throughput, latency, replicas, resync");
    let wanted: BTreeSet<String> = series(&rule).union(&series(&dashboard)).cloned().collect();
    assert!(wanted.len() >= 10, "{wanted:?}");

    let mut c = Cluster::start(2, "256MiB");
    c.sdk(0).create_full("m", 16 << 20, 2, &[]).unwrap();
    let mut nbd = Client::connect(&c.engines[0].nbd, "m").unwrap();
    assert_eq!(nbd.write(0, &[1u8; 4096], 0), 0);
    assert!(nbd.read(0, 4096).is_ok());
    c.kill9(1);
    // The first write waits out the replica timeout; then node-2 is out of sync.
    assert_eq!(nbd.write(1 << 20, &[2u8; 65536], 0), 0);
    let text = scrape(&c.engines[0].metrics);
    let served: BTreeSet<String> =
        text.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split(['{', ' ']).next()).map(String::from).collect();
    let missing: Vec<&String> = wanted.iter().filter(|s| !served.contains(*s)).collect();
    assert!(missing.is_empty(), "queried but not served: {missing:?}\n{text}");
    // The degraded-volume alert's series say what happened.
    assert!(text.contains("strata_volume_replicas{volume=\"m\"} 2"), "{text}");
    assert!(text.contains("strata_volume_replicas_in_sync{volume=\"m\"} 1"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("strata_volume_resync_missed_bytes{volume=\"m\"}") && !l.ends_with(" 0")), "{text}");
    c.restart(1);
    c.wait_in_sync(0, "m", Duration::from_secs(30));
    let text = scrape(&c.engines[0].metrics);
    assert!(text.contains("strata_volume_replicas_in_sync{volume=\"m\"} 2"), "{text}");
}
