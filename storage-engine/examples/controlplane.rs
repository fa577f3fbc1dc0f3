//! The control plane at scale, simulated: NODES node identities (each with its own etcd client
//! and lease, as an engine has) and VOLUMES volume records against one real etcd, with no data
//! path. Prints one JSON object: placement decision times as the engine makes them (list the
//! nodes, read what each holds, choose), etcd writes per volume create / attach / delete and per
//! node per second of heartbeats (etcd's committed proposals), etcd's database size, and the time
//! of a full volume listing. `bench/controlplane.sh` starts etcd and runs it.
//!
//! usage: controlplane ETCD_URL [NODES] [VOLUMES] [HEARTBEAT_SECS]

use futures::StreamExt;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};
use strata_engine::meta::etcd::Etcd;
use strata_engine::meta::{MetaStore, NodeRecord, VolumeRecord};
use strata_engine::placement::{place, Request};

const GIB: u64 = 1 << 30;

/// A counter or gauge from etcd's /metrics (the sum over its label sets).
fn metric(etcd: &str, name: &str) -> f64 {
    let hostport = etcd.trim_start_matches("http://").trim_end_matches('/');
    let mut s = std::net::TcpStream::connect(hostport).expect("etcd's metrics");
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {hostport}\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn writes(etcd: &str) -> f64 {
    metric(etcd, "etcd_server_proposals_committed_total")
}

/// One placement decision as the engine makes it (`Service::place_replicas`).
async fn decide(store: &Etcd, me: &str, repl: u32) -> (Vec<String>, Duration) {
    let t0 = Instant::now();
    let nodes = store.list_nodes().await.unwrap();
    let provisioned = store.provisioned().await.unwrap();
    let cands = strata_engine::meta::placement_candidates(nodes, &provisioned, (me, 8 << 40, false));
    let r = Request { repl, size: 10 * GIB, prefer: Some(me.to_string()), ..Default::default() };
    let chosen = place(&cands, &r).expect("a placement");
    (chosen, t0.elapsed())
}

fn median_ms(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1000.0
}

/// Volumes per page of a paged listing (stratactl's page).
const PAGE: usize = 1000;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let etcd = args.get(1).cloned().unwrap_or_else(|| "http://127.0.0.1:2379".into());
    let n: usize = args.get(2).map(|s| s.parse().unwrap()).unwrap_or(1000);
    let v: usize = args.get(3).map(|s| s.parse().unwrap()).unwrap_or(100_000);
    let hb: u64 = args.get(4).map(|s| s.parse().unwrap()).unwrap_or(30);
    let mut out = serde_json::Map::new();
    out.insert("nodes".into(), n.into());
    out.insert("volumes".into(), v.into());

    // Nodes: each its own client, lease and record, as its engine would register.
    let t0 = Instant::now();
    let ids: Vec<String> = (0..n).map(|i| format!("sim-{i:04}")).collect();
    let stores: Vec<Arc<Etcd>> = futures::stream::iter(ids.iter().enumerate())
        .map(|(i, id)| {
            let etcd = etcd.clone();
            async move {
                let s = Etcd::connect_with_ttl(&[etcd], id, 10).await.expect("etcd");
                let rec = NodeRecord {
                    id: id.clone(),
                    hostname: id.clone(),
                    total_bytes: 8 << 40,
                    zone: format!("zone-{}", i % 3),
                    rack: format!("rack-{}", i % 24),
                    version: "sim".into(),
                    ..Default::default()
                };
                s.register_node(&rec).await.expect("register");
                Arc::new(s)
            }
        })
        .buffered(32)
        .collect()
        .await;
    out.insert("register_s".into(), t0.elapsed().as_secs_f64().into());

    // Heartbeats: what NODES live engines cost etcd while nothing else happens.
    let w0 = writes(&etcd);
    tokio::time::sleep(Duration::from_secs(hb)).await;
    let per_node_s = (writes(&etcd) - w0) / (n as f64 * hb as f64);
    out.insert("heartbeat_writes_per_node_per_s".into(), per_node_s.into());

    // Volumes, 3 replicas each, placed by the placement rules over the nodes; created through
    // the node that placed them. The bulk uses one view of the nodes kept here (listing 1,000
    // nodes per volume would make the simulation the bottleneck); the engine's own full path
    // is timed separately at each size below.
    let nodes = stores[0].list_nodes().await.unwrap();
    let mut local: HashMap<String, u64> = HashMap::new();
    let mut samples = serde_json::Map::new();
    let t_create = Instant::now();
    let w_create = writes(&etcd);
    let mut created = 0usize;
    let checkpoints = [0, v / 4, v / 2, v];
    for (ci, &upto) in checkpoints.iter().enumerate() {
        let mut batch = Vec::new();
        while created < upto {
            let me = &ids[created % n];
            let cands = strata_engine::meta::placement_candidates(nodes.clone(), &local, (me, 8 << 40, false));
            let r = Request { repl: 3, size: 10 * GIB, prefer: Some(me.clone()), ..Default::default() };
            let chosen = place(&cands, &r).expect("placement");
            for c in &chosen {
                *local.entry(c.clone()).or_insert(0) += 10 * GIB;
            }
            let rec = VolumeRecord {
                name: format!("pvc-{created:06}"),
                size: 10 * GIB,
                repl: 3,
                node: chosen[0].clone(),
                replicas: chosen.clone(),
                in_sync: chosen,
                ..Default::default()
            };
            batch.push((created % n, rec));
            created += 1;
        }
        futures::stream::iter(batch)
            .map(|(i, rec)| {
                let s = stores[i].clone();
                async move { s.create_volume(rec).await.expect("create") }
            })
            .buffer_unordered(64)
            .for_each(|_| async {})
            .await;
        if ci == 0 {
            continue;
        }
        // The engine's own decision at this size: the first (lists everything and starts the
        // watch), then the steady state.
        let s = &stores[created % n];
        let me = &ids[created % n];
        let (_, first) = decide(s, me, 3).await;
        let mut times = Vec::new();
        for _ in 0..20 {
            times.push(decide(s, me, 3).await.1);
        }
        samples.insert(format!("{upto}"), serde_json::json!({"first_ms": first.as_secs_f64() * 1000.0, "median_ms": median_ms(times)}));
    }
    let create_s = t_create.elapsed().as_secs_f64();
    // The sampled decisions wrote nothing; registering watches neither.
    out.insert("create_writes_per_volume".into(), ((writes(&etcd) - w_create) / v as f64).into());
    out.insert("create_per_s".into(), (v as f64 / create_s).into());
    out.insert("placement".into(), samples.into());
    // A decision's choice itself (no etcd): candidates from the lists already read.
    let provisioned = stores[0].provisioned().await.unwrap();
    let t = Instant::now();
    for _ in 0..100 {
        let cands = strata_engine::meta::placement_candidates(nodes.clone(), &provisioned, (&ids[0], 8 << 40, false));
        place(&cands, &Request { repl: 3, size: 10 * GIB, ..Default::default() }).unwrap();
    }
    out.insert("place_only_ms".into(), (t.elapsed().as_secs_f64() * 1000.0 / 100.0).into());

    let t = Instant::now();
    let all = stores[1].list_volumes().await.unwrap();
    out.insert("list_volumes_ms".into(), (t.elapsed().as_secs_f64() * 1000.0).into());
    assert_eq!(all.len(), v);
    // The same in pages of 1,000, as `volume list` reads them through the SDK: the first page
    // alone, and a walk of every page.
    let t = Instant::now();
    let mut page = stores[1].list_volumes_page("", PAGE).await.unwrap();
    out.insert("list_first_page_ms".into(), (t.elapsed().as_secs_f64() * 1000.0).into());
    let mut walked = 0;
    loop {
        walked += page.len();
        let Some(last) = page.last().filter(|_| page.len() == PAGE) else { break };
        page = stores[1].list_volumes_page(&last.name.clone(), PAGE).await.unwrap();
    }
    out.insert("list_paged_walk_ms".into(), (t.elapsed().as_secs_f64() * 1000.0).into());
    assert_eq!(walked, v);
    out.insert("etcd_db_bytes".into(), metric(&etcd, "etcd_mvcc_db_total_size_in_bytes").into());
    out.insert("etcd_db_in_use_bytes".into(), metric(&etcd, "etcd_mvcc_db_total_size_in_use_in_bytes").into());

    // Attach (target and epoch set, as a target does) and delete, 1,000 each.
    let some: Vec<VolumeRecord> = all.into_iter().take(1000).collect();
    let w = writes(&etcd);
    let attached: Vec<VolumeRecord> = futures::stream::iter(some)
        .map(|mut rec| {
            let s = stores[2].clone();
            async move {
                rec.target = rec.replicas[0].clone();
                rec.epoch += 1;
                s.update_volume(&rec).await.expect("attach")
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    out.insert("attach_writes_per_volume".into(), ((writes(&etcd) - w) / attached.len() as f64).into());
    let w = writes(&etcd);
    futures::stream::iter(attached)
        .map(|rec| {
            let s = stores[3].clone();
            async move { s.remove_volume(&rec.name).await.expect("delete") }
        })
        .buffer_unordered(64)
        .for_each(|_| async {})
        .await;
    out.insert("delete_writes_per_volume".into(), ((writes(&etcd) - w) / 1000.0).into());
    println!("{}", serde_json::Value::Object(out));
}
