//! The operator's `/metrics` (OpenMetrics text, `prometheus-client`) and `/healthz`.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use strata_api::metrics::prometheus_client;

pub struct Metrics {
    pub reconciles: Counter,
    pub errors: Counter,
    pub pods_replaced: Counter,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let (reconciles, errors, pods_replaced) = (Counter::default(), Counter::default(), Counter::default());
        let mut registry = Registry::default();
        registry.register("strata_operator_reconciles", "Reconcile passes.", reconciles.clone());
        registry.register("strata_operator_reconcile_errors", "Reconcile passes that failed.", errors.clone());
        registry.register("strata_operator_engine_pods_replaced", "Engine pods deleted for a rolling upgrade.", pods_replaced.clone());
        Metrics { reconciles, errors, pods_replaced, registry }
    }
}

impl Metrics {
    pub fn render(&self) -> String {
        strata_api::metrics::encode(&self.registry)
    }
}

pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    use axum::{routing::get, Router};
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move { ([("content-type", strata_api::metrics::CONTENT_TYPE)], m.render()) }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }));
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!("metrics server stopped: {e}");
    }
}
