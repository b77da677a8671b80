//! Serving a `Kv.Bundle` call on any `Kv` service: each request goes to the service's own get,
//! put or delete, as if it had come alone, and the answers stream back in the order they finish.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures::FutureExt as _;
use futures::stream::{Stream, StreamExt};
use prost::Message as _;
use tonic::{Request, Status};

use crate::errors::bundled_error;
use crate::v1::kv_server::Kv;
use crate::v1::{BundleRequest, BundleResponse, BundledRequest, BundledResponse, bundled_request, bundled_response};

/// Most requests one `Bundle` call may carry.
pub const MAX_BUNDLED_REQUESTS: usize = 1024;

/// The answers of one `Bundle` call, in the order they finish.
pub type BundleAnswers = Pin<Box<dyn Stream<Item = Result<BundleResponse, Status>> + Send>>;

/// Serves every request of `bundle` on `service`, each as a task of its own (they run on every
/// core, and go on while the caller reads slowly), within the call's deadline (`grpc-timeout`,
/// as tonic bounds a lone call). Answers that finish together leave in one message. Dropping the
/// answers (the caller went away) stops the requests not finished, as it stops a lone call.
pub fn serve<S: Kv + Clone>(service: &S, bundle: Request<BundleRequest>) -> Result<BundleAnswers, Status> {
    let deadline = deadline_of(bundle.metadata()).map(|timeout| tokio::time::Instant::now() + timeout);
    let requests = bundle.into_inner().requests;
    if requests.len() > MAX_BUNDLED_REQUESTS {
        return Err(Status::invalid_argument(format!(
            "a bundle holds at most {MAX_BUNDLED_REQUESTS} requests; this one holds {}",
            requests.len()
        )));
    }
    let mut serving = tokio::task::JoinSet::new();
    for (index, bundled) in requests.into_iter().enumerate() {
        let service = service.clone();
        serving.spawn(answered(index as u32, deadline, async move { serve_one(&service, bundled).await }));
    }
    let answers = futures::stream::unfold(serving, |mut serving| async move {
        loop {
            // A task ends with an error only if aborted, which happens when the answers are
            // dropped (a request that panics is answered, see `answered`).
            if let Ok(answer) = serving.join_next().await? {
                return Some((answer, serving));
            }
        }
    });
    let messages = answers.ready_chunks(MAX_BUNDLED_REQUESTS).flat_map(|answers| {
        futures::stream::iter(
            by_size(answers, MAX_ANSWER_BYTES).into_iter().map(|responses| Ok(BundleResponse { responses })),
        )
    });
    Ok(Box::pin(messages))
}

/// The answer to request `index`: what `served` gives, or the error that it panicked or missed
/// the deadline.
async fn answered(
    index: u32,
    deadline: Option<tokio::time::Instant>,
    served: impl Future<Output = Result<bundled_response::Response, Status>>,
) -> BundledResponse {
    let served = std::panic::AssertUnwindSafe(served).catch_unwind();
    let outcome = match deadline {
        None => served.await,
        Some(deadline) => match tokio::time::timeout_at(deadline, served).await {
            Ok(outcome) => outcome,
            Err(_) => Ok(Err(Status::deadline_exceeded("the bundle's deadline passed before this request was served"))),
        },
    };
    let answer = match outcome {
        Ok(answer) => answer,
        Err(_) => Err(Status::internal("serving this request failed (a panic in the node; see its log)")),
    };
    BundledResponse {
        index,
        response: Some(answer.unwrap_or_else(|status| bundled_response::Response::Error(bundled_error(&status)))),
    }
}

/// The call's `grpc-timeout`, if it has a valid one (gRPC over HTTP/2: at most 8 digits and a
/// unit, H M S m u n).
fn deadline_of(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let digits = value.get(..value.len().checked_sub(1)?)?;
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match &value[digits.len()..] {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
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

async fn serve_one<S: Kv>(service: &S, bundled: BundledRequest) -> Result<bundled_response::Response, Status> {
    use bundled_request::Request as Asked;
    use bundled_response::Response as Answer;
    match bundled.request {
        Some(Asked::Get(req)) => service.get(Request::new(req)).await.map(|r| Answer::Get(r.into_inner())),
        Some(Asked::Put(req)) => service.put(Request::new(req)).await.map(|r| Answer::Put(r.into_inner())),
        Some(Asked::Delete(req)) => service.delete(Request::new(req)).await.map(|r| Answer::Delete(r.into_inner())),
        None => Err(Status::invalid_argument("a bundled request names no operation (get, put or delete)")),
    }
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

    #[test]
    fn grpc_timeouts_are_read_in_every_unit_and_bad_ones_ignored() {
        let with = |value: &str| {
            let mut metadata = tonic::metadata::MetadataMap::new();
            metadata.insert("grpc-timeout", value.parse().unwrap());
            deadline_of(&metadata)
        };
        assert_eq!(with("5S"), Some(Duration::from_secs(5)));
        assert_eq!(with("1500m"), Some(Duration::from_millis(1500)));
        assert_eq!(with("2M"), Some(Duration::from_secs(120)));
        assert_eq!(with("7u"), Some(Duration::from_micros(7)));
        assert_eq!((with("S"), with("123456789S"), with("5x"), with("-5S")), (None, None, None, None));
        assert_eq!(deadline_of(&tonic::metadata::MetadataMap::new()), None);
    }
}
