//! Storage health monitor: moves pods off a node only when its storage is really gone — the
//! engine is Offline in the metadata store AND its data port is unreachable — continuously for
//! a grace period. A cycle in which the metadata store or the API server cannot be read decides
//! nothing, so a control-plane blip never evicts anyone. Deletions are rate-limited. A pod
//! already terminating is not deleted again: its node will never confirm the deletion, so once
//! it has been terminating for the grace period it is force-deleted and its volumes'
//! VolumeAttachments on that node are removed (as STORK does), within the same per-round bound.

use crate::cluster::Cluster;
use crate::extender::Metrics;
use crate::storage::StorageView;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub node: String,
    pub offline: bool,
    pub reachable: bool,
}

/// Advances the per-node "down since" clocks with one round of observations and returns the
/// nodes whose storage has been gone for at least `grace`. Pure.
pub fn decide(now: Instant, down_since: &mut BTreeMap<String, Instant>, obs: &[Observation], grace: Duration) -> Vec<String> {
    let mut gone = Vec::new();
    for o in obs {
        if o.offline && !o.reachable {
            let since = *down_since.entry(o.node.clone()).or_insert(now);
            if now.duration_since(since) >= grace {
                gone.push(o.node.clone());
            }
        } else {
            down_since.remove(&o.node);
        }
    }
    // Nodes no longer reported at all are forgotten (their clocks restart if they reappear).
    down_since.retain(|n, _| obs.iter().any(|o| &o.node == n));
    gone
}

#[derive(Debug, Clone)]
pub struct MonitorConfig {
    pub grace: Duration,
    pub probe_timeout: Duration,
    /// Pod deletions allowed per cycle, across all nodes.
    pub max_evictions_per_cycle: usize,
}

pub struct Monitor {
    pub cfg: MonitorConfig,
    pub cluster: Arc<dyn Cluster>,
    pub storage: Arc<dyn StorageView>,
    pub metrics: Arc<Metrics>,
    down_since: BTreeMap<String, Instant>,
    /// Pods ("namespace/name/uid") on gone nodes first seen terminating at.
    terminating_since: BTreeMap<String, Instant>,
}

/// Can we open a TCP connection to the node's data port?
pub async fn reachable(addr: &str, timeout: Duration) -> bool {
    matches!(tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await, Ok(Ok(_)))
}

impl Monitor {
    pub fn new(cfg: MonitorConfig, cluster: Arc<dyn Cluster>, storage: Arc<dyn StorageView>, metrics: Arc<Metrics>) -> Monitor {
        Monitor { cfg, cluster, storage, metrics, down_since: BTreeMap::new(), terminating_since: BTreeMap::new() }
    }

    /// One round. Returns the pods deleted ("namespace/name"; force-deleted ones as
    /// "namespace/name (forced)").
    pub async fn tick(&mut self, now: Instant) -> Vec<String> {
        let nodes = match self.storage.nodes().await {
            Ok(n) => n,
            Err(e) => {
                tracing::info!("health monitor: metadata store unreadable, deciding nothing this round: {e}");
                return vec![];
            }
        };
        let mut obs = Vec::new();
        for n in &nodes {
            let offline = n.status == "offline";
            let reach = if offline { reachable(&n.data_address, self.cfg.probe_timeout).await } else { true };
            obs.push(Observation { node: n.id.clone(), offline, reachable: reach });
        }
        let gone = decide(now, &mut self.down_since, &obs, self.cfg.grace);
        let mut deleted = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for node in gone {
            let pods = match self.cluster.pods_on_node(&node).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::info!("health monitor: API server unreadable, deciding nothing this round: {e}");
                    return deleted;
                }
            };
            for pod in pods {
                if deleted.len() >= self.cfg.max_evictions_per_cycle {
                    return deleted;
                }
                let ns = if pod.metadata.namespace.is_empty() { "default" } else { &pod.metadata.namespace };
                let key = format!("{ns}/{}/{}", pod.metadata.name, pod.metadata.uid);
                if pod.metadata.deletion_timestamp.is_some() {
                    seen.insert(key.clone());
                    let since = *self.terminating_since.entry(key.clone()).or_insert(now);
                    if now.duration_since(since) < self.cfg.grace {
                        continue; // deleted already; the kubelet of a dead node never confirms it
                    }
                }
                let volumes = match self.cluster.pod_volumes(&pod).await {
                    Ok(v) if !v.is_empty() => v,
                    Ok(_) => continue,
                    Err(e) => {
                        tracing::info!("health monitor: cannot read volumes of pod {}: {e}", pod.metadata.name);
                        continue;
                    }
                };
                if pod.metadata.deletion_timestamp.is_some() {
                    match self.cluster.force_delete_pod(ns, &pod.metadata.name).await {
                        Ok(()) => {
                            match self.cluster.delete_volume_attachments(&node, &volumes).await {
                                Ok(vas) if !vas.is_empty() => {
                                    tracing::warn!(node = %node, attachments = ?vas, "deleted volume attachments on a node whose storage is gone")
                                }
                                Ok(_) => {}
                                Err(e) => tracing::warn!("health monitor: {e}"),
                            }
                            tracing::warn!(node = %node, pod = %pod.metadata.name, "storage gone on node: force-deleted a pod stuck terminating");
                            self.metrics.evictions.inc();
                            deleted.push(format!("{ns}/{} (forced)", pod.metadata.name));
                        }
                        Err(e) => tracing::warn!("health monitor: {e}"),
                    }
                    continue;
                }
                match self.cluster.delete_pod(ns, &pod.metadata.name).await {
                    Ok(()) => {
                        tracing::warn!(node = %node, pod = %pod.metadata.name, "storage gone on node: deleted pod so it reschedules");
                        self.metrics.evictions.inc();
                        deleted.push(format!("{ns}/{}", pod.metadata.name));
                        seen.insert(key.clone());
                        self.terminating_since.insert(key, now);
                    }
                    Err(e) => tracing::warn!("health monitor: {e}"),
                }
            }
        }
        // Pods no longer seen terminating (gone, or their node came back) are forgotten.
        self.terminating_since.retain(|k, _| seen.contains(k));
        deleted
    }

    pub async fn run(mut self, interval: Duration) {
        let mut t = tokio::time::interval(interval);
        loop {
            t.tick().await;
            self.tick(Instant::now()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(node: &str, offline: bool, reachable: bool) -> Observation {
        Observation { node: node.into(), offline, reachable }
    }

    #[test]
    fn only_offline_and_unreachable_for_the_whole_grace_counts() {
        let grace = Duration::from_secs(60);
        let t0 = Instant::now();
        let mut d = BTreeMap::new();
        assert!(decide(t0, &mut d, &[o("a", true, false), o("b", true, true), o("c", false, false)], grace).is_empty());
        assert_eq!(decide(t0 + Duration::from_secs(59), &mut d, &[o("a", true, false)], grace), Vec::<String>::new());
        assert_eq!(decide(t0 + Duration::from_secs(60), &mut d, &[o("a", true, false)], grace), vec!["a".to_string()]);
    }

    #[test]
    fn a_restart_inside_the_grace_period_resets_the_clock() {
        let grace = Duration::from_secs(60);
        let t0 = Instant::now();
        let mut d = BTreeMap::new();
        decide(t0, &mut d, &[o("a", true, false)], grace);
        decide(t0 + Duration::from_secs(30), &mut d, &[o("a", false, true)], grace); // came back
        assert!(decide(t0 + Duration::from_secs(70), &mut d, &[o("a", true, false)], grace).is_empty(), "clock restarted at 70 s");
        assert_eq!(decide(t0 + Duration::from_secs(130), &mut d, &[o("a", true, false)], grace), vec!["a".to_string()]);
    }
}
