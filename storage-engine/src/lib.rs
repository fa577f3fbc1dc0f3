//! Strata storage engine: one node's pool, volumes, NBD frontend and SDK server.

pub mod alerts;
pub mod clock;
pub mod cloudsnap;
pub mod cluster;
pub mod config;
pub mod crypt;
pub mod device;
pub mod failpoint;
pub mod frontend;
pub mod meta;
pub mod metrics;
pub mod net;
pub mod placement;
pub mod pool;
pub mod qos;
pub mod replica;
pub mod replication;
pub mod sdk;
pub mod security;
pub mod server;
#[doc(hidden)]
pub mod testing;
pub mod volume;

/// This engine's version (the crate's), as nodes report it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
