//! Strata storage engine: one node's pool, volumes, NBD frontend and SDK server.

pub mod device;
pub mod meta;
pub mod metrics;
pub mod pool;
pub mod volume;
