//! strata-stork: a kube-scheduler extender that places pods next to their Strata volumes'
//! replicas, and a health monitor that moves pods off nodes whose storage is really gone.

pub mod cluster;
pub mod config;
pub mod extender;
pub mod health;
pub mod https;
pub mod migration;
pub mod placement;
pub mod storage;
