//! Cluster decisions over what the metadata store knows: replica placement, maintenance and
//! decommission of nodes.

pub mod maintenance;
pub mod placement;
