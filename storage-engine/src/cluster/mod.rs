//! Cluster decisions over what the metadata store knows: replica placement, maintenance and
//! decommission of nodes, and this node's drives.

pub mod drives;
pub mod maintenance;
pub mod placement;
