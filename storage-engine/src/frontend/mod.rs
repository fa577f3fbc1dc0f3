//! Frontends that expose volumes to clients on this node.

pub mod nbd;
