//! The data path between nodes: a framed, pipelined binary protocol over TCP (`frame`, `client`,
//! `server`), the volume target that fans writes out to in-sync replicas (`target`), the record
//! of regions a replica missed (`dirty`) the copy that brings it back (`resync`), and the comparison of
//! in-sync replicas after an unclean change of target (`reconcile`).

pub mod authority;
pub mod client;
pub mod dirty;
pub mod frame;
pub mod legs;
pub mod reconcile;
pub mod resync;
pub mod server;
pub mod target;

use crate::replica::Local;
use std::sync::Arc;

/// What a target's background work (resync, reconcile) needs from its node: the local data
/// path (reads of the source, alerts) and where to ask for a replica to be rebuilt elsewhere.
pub struct Host {
    pub local: Arc<Local>,
    /// (volume, node) pairs whose replica should be rebuilt on another node.
    pub replacements: Option<tokio::sync::mpsc::UnboundedSender<(String, String)>>,
}

impl Host {
    pub(crate) fn request_replacement(&self, name: &str, node: &str) {
        if let Some(tx) = &self.replacements {
            let _ = tx.send((name.to_string(), node.to_string()));
        }
    }
}
