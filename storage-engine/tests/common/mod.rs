//! The engine tests' harness lives in `strata-e2e` (shared with the cluster tests).
#![allow(unused_imports)]

pub use strata_e2e::*;
