//! Strata storage engine: one node's pool, volumes, NBD frontend and SDK server.

pub mod config;
pub mod device;
pub mod frontend;
pub mod meta;
pub mod metrics;
pub mod pool;
pub mod qos;
pub mod sdk;
pub mod server;
pub mod volume;
