//! strata-e2e: real processes for tests — etcd, engines, a blocking SDK client, a minimal NBD
//! client, a cluster of several engines with fault helpers, and a checker of acknowledged writes.
#![allow(clippy::result_large_err)]

pub mod checker;
pub mod cluster;
pub mod engine;
pub mod etcd;
pub mod nbd;
pub mod proxy;
pub mod s3;
pub mod sdk;
pub mod util;

pub use engine::{certs, engine_bin, EngineProc};
pub use etcd::{free_port, EtcdProc};
pub use sdk::Sdk;
pub use util::{pseudo_random, qemu_io, run, scrape, tempdir};
