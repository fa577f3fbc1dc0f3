//! Node lifecycle over the volume service: maintenance and decommission of nodes, and this
//! node's drives. (Replica placement, a pure decision every layer may ask, is `placement`.)

pub mod drives;
pub mod maintenance;
