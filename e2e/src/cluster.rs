//! A cluster of engines on one etcd, each a real process with its own data directory and
//! file-backed pool, with helpers to break them: kill -9, pause (SIGSTOP) / resume (SIGCONT),
//! restart.

use crate::{certs, EngineProc, EtcdProc, Sdk};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use strata_api::v1 as pb;

/// Seconds without lease renewal before a node reads as offline (short, so tests are quick).
pub const NODE_TTL: &str = "3";
/// Seconds a replica may take before the target drops it from the in-sync set: the engine's
/// default, so a replica slowed by a loaded test machine stays in sync.
pub const REPLICA_TIMEOUT: &str = "5";
/// The engine flags of a cluster whose tests pause or cut replicas: a replica that does not
/// answer within 1 s leaves the in-sync set, so the test need not wait out the default.
pub const FAST_FAILOVER: [&str; 2] = ["--replica-io-timeout", "1"];

pub struct Cluster {
    pub etcd: EtcdProc,
    pub engines: Vec<EngineProc>,
    /// The cluster CA (`strata-engine certs init`): every engine replicates over mutual TLS.
    pub ca: tempfile::TempDir,
    /// The token the cluster's own helpers (`sdk`, `wait_*`, `replica_differences`) send, for
    /// engines that check tokens.
    pub token: Option<String>,
    _dirs: Vec<tempfile::TempDir>,
}

impl Cluster {
    /// `n` engines named node-1..node-n, each with one device file of `dev_size`.
    pub fn start(n: usize, dev_size: &str) -> Cluster {
        Self::start_with(n, dev_size, &[])
    }

    pub fn start_with(n: usize, dev_size: &str, extra: &[&str]) -> Cluster {
        let mut c = Cluster::empty();
        for _ in 0..n {
            let url = c.etcd.url.clone();
            c.add(&url, dev_size, extra);
        }
        c
    }

    /// etcd alone; engines come with `add`.
    pub fn empty() -> Cluster {
        let ca = crate::tempdir();
        certs(&["init".as_ref(), "--dir".as_ref(), ca.path().as_os_str()]);
        Cluster { etcd: EtcdProc::start(), engines: Vec::new(), ca, token: None, _dirs: Vec::new() }
    }

    /// Starts the next engine (node-N) on etcd at `etcd_url` (which may be a proxy).
    pub fn add(&mut self, etcd_url: &str, dev_size: &str, extra: &[&str]) -> usize {
        let d = crate::tempdir();
        let id = format!("node-{}", self.engines.len() + 1);
        let tls = d.path().join("tls");
        certs(&[
            "issue".as_ref(),
            "--ca-dir".as_ref(),
            self.ca.path().as_os_str(),
            "--node-id".as_ref(),
            id.as_ref(),
            "--out".as_ref(),
            tls.as_os_str(),
        ]);
        let tls = tls.to_str().expect("a UTF-8 temp path").to_string();
        let mut args = vec!["--etcd", etcd_url, "--node-id", &id, "--node-ttl", NODE_TTL, "--tls-dir", &tls];
        // The cluster's short replica timeout, unless the test gives its own.
        if !extra.contains(&"--replica-io-timeout") {
            args.extend(["--replica-io-timeout", REPLICA_TIMEOUT]);
        }
        args.extend_from_slice(extra);
        self.engines.push(EngineProc::start_with(d.path(), 1, dev_size, &args));
        self._dirs.push(d);
        self.engines.len() - 1
    }

    pub fn sdk(&self, i: usize) -> Sdk {
        Sdk::connect(&self.engines[i].sdk, self.token.as_deref(), self.engines[i].client_tls().as_ref())
    }

    /// The index of node `id` (node-1 is 0).
    pub fn index(&self, id: &str) -> usize {
        id.strip_prefix("node-").and_then(|n| n.parse::<usize>().ok()).expect("node-N") - 1
    }

    pub fn kill9(&mut self, i: usize) {
        self.engines[i].kill9();
    }

    pub fn restart(&mut self, i: usize) {
        self.engines[i].kill9();
        self.engines[i].spawn().expect("engine restarts");
    }

    pub fn pause(&self, i: usize) {
        self.engines[i].signal(libc::SIGSTOP);
    }

    pub fn resume(&self, i: usize) {
        self.engines[i].signal(libc::SIGCONT);
    }

    /// Polls `inspect` on engine `via` until `pred` holds; panics after `timeout`.
    pub fn wait_volume(&self, via: usize, name: &str, timeout: Duration, what: &str, pred: impl Fn(&pb::Volume) -> bool) -> pb::Volume {
        let sdk = self.sdk(via);
        let t0 = Instant::now();
        loop {
            if let Ok(v) = sdk.inspect(name) {
                if pred(&v) {
                    return v;
                }
                assert!(t0.elapsed() < timeout, "{what}: not reached in {timeout:?}; volume is {v:?}");
            } else {
                assert!(t0.elapsed() < timeout, "{what}: volume {name} cannot be inspected");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until every replica of `name` is in sync again.
    pub fn wait_in_sync(&self, via: usize, name: &str, timeout: Duration) -> pb::Volume {
        self.wait_volume(via, name, timeout, "all replicas in sync", |v| {
            if v.verifying {
                return false;
            }
            let mut a = v.replica_nodes.clone();
            let mut b = v.in_sync_nodes.clone();
            a.sort();
            b.sort();
            a == b
        })
    }

    /// Compares the per-extent checksums of every in-sync replica of `name` (an extent one
    /// replica has not allocated must read as zeroes on the others). Returns the differences.
    pub fn replica_differences(&self, via: usize, name: &str) -> Vec<String> {
        let v = self.sdk(via).inspect(name).expect("inspect");
        let mut maps: Vec<(String, u64, BTreeMap<u64, u32>)> = Vec::new();
        for node in &v.in_sync_nodes {
            let (es, sums) = self.sdk(self.index(node)).checksums(name).expect("checksums");
            maps.push((node.clone(), es, sums.into_iter().collect()));
        }
        let mut out = Vec::new();
        let Some((first, es, base)) = maps.first() else { return out };
        let size = v.spec.as_ref().map_or(0, |s| s.size_bytes);
        let zero = |x: u64| crc32c_zeroes((*es).min(size.saturating_sub(x * es)) as usize);
        for (node, _, m) in &maps[1..] {
            let keys: std::collections::BTreeSet<u64> = base.keys().chain(m.keys()).copied().collect();
            for k in keys {
                let a = base.get(&k).copied().unwrap_or_else(|| zero(k));
                let b = m.get(&k).copied().unwrap_or_else(|| zero(k));
                if a != b {
                    out.push(format!("extent {k}: {first} has {a:#010x}, {node} has {b:#010x}"));
                }
            }
        }
        out
    }
}

/// crc32c of `len` zero bytes.
pub fn crc32c_zeroes(len: usize) -> u32 {
    crc32c::crc32c(&vec![0u8; len])
}
