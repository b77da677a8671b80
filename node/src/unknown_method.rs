//! Unknown gRPC services and methods: tonic answers them UNIMPLEMENTED with an empty message;
//! this layer fills in a message naming the path asked for and the services this node serves.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The services a node serves, for the message.
const SERVED: &str = "kvfleet.v1.Kv, kvfleet.v1.Admin, grpc.health.v1.Health and grpc.reflection.v1.ServerReflection";

#[derive(Debug, Clone, Copy, Default)]
pub struct ExplainUnimplementedLayer;

impl<S> tower::Layer<S> for ExplainUnimplementedLayer {
    type Service = ExplainUnimplemented<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ExplainUnimplemented { inner }
    }
}

#[derive(Debug, Clone)]
pub struct ExplainUnimplemented<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for ExplainUnimplemented<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let path = request.uri().path().to_string();
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            explain(response.headers_mut(), &path);
            Ok(response)
        })
    }
}

/// Adds a `grpc-message` to an UNIMPLEMENTED answer that has none.
fn explain(headers: &mut http::HeaderMap, path: &str) {
    let unimplemented = headers.get("grpc-status").is_some_and(|v| v.as_bytes() == b"12");
    let has_message = headers.get("grpc-message").is_some_and(|v| !v.is_empty());
    if !unimplemented || has_message {
        return;
    }
    // grpc-message is percent-encoded: keep it to printable ASCII without '%'.
    let path: String = path.chars().map(|c| if c.is_ascii_graphic() && c != '%' { c } else { '?' }).collect();
    let message = format!("unknown method {path}: this node serves {SERVED}");
    if let Ok(value) = http::HeaderValue::from_str(&message) {
        headers.insert("grpc-message", value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_unimplemented_answer_gets_a_message_naming_the_path() {
        let mut headers = http::HeaderMap::new();
        headers.insert("grpc-status", http::HeaderValue::from_static("12"));
        explain(&mut headers, "/kvfleet.v1.Kv/Frobnicate");
        let message = headers["grpc-message"].to_str().unwrap();
        assert!(message.starts_with("unknown method /kvfleet.v1.Kv/Frobnicate: this node serves kvfleet.v1.Kv"));
    }

    #[test]
    fn other_answers_are_left_alone() {
        let mut ok = http::HeaderMap::new();
        ok.insert("grpc-status", http::HeaderValue::from_static("0"));
        explain(&mut ok, "/x");
        assert!(ok.get("grpc-message").is_none());
        let mut explained = http::HeaderMap::new();
        explained.insert("grpc-status", http::HeaderValue::from_static("12"));
        explained.insert("grpc-message", http::HeaderValue::from_static("not here"));
        explain(&mut explained, "/x");
        assert_eq!(explained["grpc-message"], "not here");
    }
}
