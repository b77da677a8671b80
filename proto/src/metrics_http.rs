//! The Prometheus `/metrics` HTTP endpoint, shared by the node and the operator.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::registry::Registry;

/// Serves `GET /metrics` until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    registry: Arc<Registry>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::{StatusCode, header::CONTENT_TYPE};
    use axum::response::IntoResponse;
    let render = move || {
        let registry = registry.clone();
        async move {
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, &registry) {
                Ok(()) => {
                    let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
                    ([(CONTENT_TYPE, content_type)], body).into_response()
                }
                Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
            }
        }
    };
    let app = axum::Router::new().route("/metrics", axum::routing::get(render));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

/// Serves `GET /metrics` in a background task until `shutdown` resolves; logs if it fails.
pub fn spawn(
    addr: SocketAddr,
    registry: Arc<Registry>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    tokio::spawn(async move {
        if let Err(error) = serve(addr, registry, shutdown).await {
            tracing::error!(%addr, %error, "metrics endpoint failed");
        }
    });
}
