//! The HTTP endpoint shared by the node and the operator: Prometheus `/metrics`, and the
//! health checks Kubernetes probes (`/healthz`: the process serves; `/readyz`: it takes
//! traffic). Plain HTTP probes work on every Kubernetes version, unlike gRPC probes (1.24+).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether the process takes traffic: `GET /readyz` answers 200 while set, 503 otherwise.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Ready from the start (a process with nothing to wait for).
    pub fn ready() -> Self {
        let readiness = Readiness::default();
        readiness.set(true);
        readiness
    }

    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

use prometheus_client::registry::Registry;

/// Serves `GET /metrics`, `/healthz` and `/readyz` until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    registry: Arc<Registry>,
    readiness: Readiness,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let encode = move |body: &mut String| prometheus_client::encoding::text::encode(body, &registry);
    serve_with(addr, encode, readiness, shutdown).await
}

/// Serves `GET /metrics` rendered by `encode` (for registries that grow while served),
/// `GET /healthz` (200 while the process serves) and `GET /readyz` (200 while `readiness` is
/// set, else 503), until `shutdown` resolves.
pub async fn serve_with(
    addr: SocketAddr,
    encode: impl Fn(&mut String) -> std::fmt::Result + Clone + Send + Sync + 'static,
    readiness: Readiness,
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
    let ready = move || {
        let readiness = readiness.clone();
        async move {
            if readiness.is_ready() {
                (StatusCode::OK, "ready").into_response()
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
            }
        }
    };
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(render))
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route("/readyz", axum::routing::get(ready));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

/// `serve` in a background task until `shutdown` resolves; logs if it fails.
pub fn spawn(
    addr: SocketAddr,
    registry: Arc<Registry>,
    readiness: Readiness,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    tokio::spawn(async move {
        if let Err(error) = serve(addr, registry, readiness, shutdown).await {
            tracing::error!(%addr, %error, "metrics endpoint failed");
        }
    });
}

/// `spawn` for an `encode` function (see `serve_with`).
pub fn spawn_with(
    addr: SocketAddr,
    encode: impl Fn(&mut String) -> std::fmt::Result + Clone + Send + Sync + 'static,
    readiness: Readiness,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    tokio::spawn(async move {
        if let Err(error) = serve_with(addr, encode, readiness, shutdown).await {
            tracing::error!(%addr, %error, "metrics endpoint failed");
        }
    });
}
