//! Strata SDK: the gRPC API every component uses to talk to a storage engine,
//! plus the small units shared by the engine and its clients.

pub mod auth;
pub mod logging;
pub mod metrics;
pub mod pki;
pub mod schedule;
pub mod tls;
pub mod units;

/// The URI of an SDK endpoint given as `host:port` or as a full URI (`http://host:port`).
pub fn endpoint_uri(endpoint: &str) -> String {
    if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    }
}

/// Generated protobuf and tonic code for `strata.v1`.
#[allow(clippy::all)]
pub mod v1 {
    tonic::include_proto!("strata.v1");
}

/// Generated protobuf and tonic code for the CSI v1 services (`csi.v1`).
#[allow(clippy::all)]
pub mod csi {
    tonic::include_proto!("csi.v1");
}

/// The largest SDK answer a client takes (tonic's default is 4 MiB): a `volume list` of every
/// volume is one message, about 300 bytes a volume, so 4 MiB ends near 13,000 volumes.
pub const MAX_ANSWER_BYTES: usize = 256 << 20;
