//! Serving a `Kv.Bundle` call on any `Kv` service: each request goes to the service's own get,
//! put or delete, as if it had come alone, and the answers stream back in the order they finish.

use std::pin::Pin;

use futures::stream::{FuturesUnordered, Stream, StreamExt};
use prost::Message as _;
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
    let messages = serving.ready_chunks(MAX_BUNDLED_REQUESTS).flat_map(|answers| {
        futures::stream::iter(
            by_size(answers, MAX_ANSWER_BYTES).into_iter().map(|responses| Ok(BundleResponse { responses })),
        )
    });
    Ok(Box::pin(messages))
}

/// Answers finished together leave in messages of about this many bytes at most (one answer
/// larger than that leaves alone), so that no message grows past what a client decodes.
pub const MAX_ANSWER_BYTES: usize = 1 << 20;

/// `answers` in groups of at most `max_bytes` encoded, in order; an answer larger than that
/// makes a group of its own.
fn by_size(answers: Vec<BundledResponse>, max_bytes: usize) -> Vec<Vec<BundledResponse>> {
    let mut groups: Vec<Vec<BundledResponse>> = Vec::new();
    let mut bytes = 0;
    for answer in answers {
        let size = answer.encoded_len();
        match groups.last_mut() {
            Some(group) if bytes + size <= max_bytes => group.push(answer),
            _ => {
                groups.push(vec![answer]);
                bytes = 0;
            }
        }
        bytes += size;
    }
    groups
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::GetResponse;

    fn answer(index: u32, value_bytes: usize) -> BundledResponse {
        let get = GetResponse { header: None, found: true, value: vec![7u8; value_bytes].into() };
        BundledResponse { index, response: Some(bundled_response::Response::Get(get)) }
    }

    #[test]
    fn answers_are_grouped_by_size_in_order_and_a_large_one_goes_alone() {
        let answers = vec![answer(0, 400), answer(1, 400), answer(2, 2000), answer(3, 100), answer(4, 100)];
        let groups = by_size(answers, 1000);
        let indexes: Vec<Vec<u32>> = groups.iter().map(|g| g.iter().map(|a| a.index).collect()).collect();
        assert_eq!(indexes, vec![vec![0, 1], vec![2], vec![3, 4]]);
        assert!(by_size(Vec::new(), 1000).is_empty());
    }
}
