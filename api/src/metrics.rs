//! The one metrics library every Strata binary uses (`prometheus-client`), and how each serves
//! its registry on `/metrics` (OpenMetrics text).

pub use prometheus_client;
use prometheus_client::registry::Registry;

/// The content type of the exposition that `encode` writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The registry as OpenMetrics text.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}
