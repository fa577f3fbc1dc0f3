//! Transmission phase: pure frames in `frame`, the pipelined connection in `conn`.

pub mod conn;
pub mod frame;
