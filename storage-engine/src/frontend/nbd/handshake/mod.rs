//! Fixed newstyle negotiation: pure frames in `frame`, the socket side in `conn`.

pub mod conn;
pub mod frame;
