//! Serving a `Kv.Bundle` call on any `Kv` service: each request goes to the service's own get,
//! put or delete, as if it had come alone, and the answers stream back in the order they finish.

use std::pin::Pin;

use futures::stream::{FuturesUnordered, Stream, StreamExt};
use tonic::{Request, Status};

use crate::errors::bundled_error;
use crate::v1::kv_server::Kv;
use crate::v1::{BundleRequest, BundleResponse, BundledRequest, BundledResponse, bundled_request, bundled_response};

/// Most requests one `Bundle` call may carry.
pub const MAX_BUNDLED_REQUESTS: usize = 1024;

/// The answers of one `Bundle` call, in the order they finish.
pub type BundleAnswers = Pin<Box<dyn Stream<Item = Result<BundleResponse, Status>> + Send>>;

/// Serves every request of `bundle` on `service`, all at once. Answers that finish together
/// leave in one message.
pub fn serve<S: Kv + Clone>(service: &S, bundle: BundleRequest) -> Result<BundleAnswers, Status> {
    let requests = bundle.requests;
    if requests.len() > MAX_BUNDLED_REQUESTS {
        return Err(Status::invalid_argument(format!(
            "a bundle holds at most {MAX_BUNDLED_REQUESTS} requests; this one holds {}",
            requests.len()
        )));
    }
    let serving: FuturesUnordered<_> = requests
        .into_iter()
        .enumerate()
        .map(|(index, bundled)| {
            let service = service.clone();
            async move { serve_one(&service, index as u32, bundled).await }
        })
        .collect();
    Ok(Box::pin(serving.ready_chunks(MAX_BUNDLED_REQUESTS).map(|responses| Ok(BundleResponse { responses }))))
}

async fn serve_one<S: Kv>(service: &S, index: u32, bundled: BundledRequest) -> BundledResponse {
    use bundled_request::Request as Asked;
    use bundled_response::Response as Answer;
    let answer = match bundled.request {
        Some(Asked::Get(req)) => service.get(Request::new(req)).await.map(|r| Answer::Get(r.into_inner())),
        Some(Asked::Put(req)) => service.put(Request::new(req)).await.map(|r| Answer::Put(r.into_inner())),
        Some(Asked::Delete(req)) => service.delete(Request::new(req)).await.map(|r| Answer::Delete(r.into_inner())),
        None => Err(Status::invalid_argument("a bundled request names no operation (get, put or delete)")),
    };
    BundledResponse { index, response: Some(answer.unwrap_or_else(|status| Answer::Error(bundled_error(&status)))) }
}
