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
    serve_with(addr, move |body: &mut String| prometheus_client::encoding::text::encode(body, &registry), shutdown)
        .await
}

/// Serves `GET /metrics` rendered by `encode` (for registries that grow while served), and
/// `GET /healthz` (200 while the process serves), until `shutdown` resolves.
pub async fn serve_with(
    addr: SocketAddr,
    encode: impl Fn(&mut String) -> std::fmt::Result + Clone + Send + Sync + 'static,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::{StatusCode, header::CONTENT_TYPE};
    use axum::response::IntoResponse;
    let render = move || {
        let encode = encode.clone();
        async move {
            let mut body = String::new();
            match encode(&mut body) {
                Ok(()) => {
                    let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
                    ([(CONTENT_TYPE, content_type)], body).into_response()
                }
                Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
            }
        }
    };
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(render))
        .route("/healthz", axum::routing::get(|| async { "ok" }));
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

/// `spawn` for an `encode` function (see `serve_with`).
pub fn spawn_with(
    addr: SocketAddr,
    encode: impl Fn(&mut String) -> std::fmt::Result + Clone + Send + Sync + 'static,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    tokio::spawn(async move {
        if let Err(error) = serve_with(addr, encode, shutdown).await {
            tracing::error!(%addr, %error, "metrics endpoint failed");
        }
    });
}
