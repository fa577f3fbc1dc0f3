//! Strata SDK: the gRPC API every component uses to talk to a storage engine,
//! plus the small units shared by the engine and its clients.

pub mod units;

/// Generated protobuf and tonic code for `strata.v1`.
#[allow(clippy::all)]
pub mod v1 {
    tonic::include_proto!("strata.v1");
}
