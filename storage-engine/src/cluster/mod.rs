//! Cluster decisions over what the metadata store knows: replica placement.

pub mod placement;
