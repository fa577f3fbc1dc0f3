//! The data path between nodes: a framed, pipelined binary protocol over TCP (`frame`, `client`,
//! `server`), the volume target that fans writes out to in-sync replicas (`target`), the record
//! of regions a replica missed (`dirty`) the copy that brings it back (`resync`), and the comparison of
//! in-sync replicas after an unclean change of target (`reconcile`).

pub mod client;
pub mod dirty;
pub mod frame;
pub mod reconcile;
pub mod resync;
pub mod server;
pub mod target;
