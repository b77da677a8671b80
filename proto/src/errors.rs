//! Typed error details on gRPC statuses: kvfleet encodes a `google.rpc.Status` whose `details`
//! hold a `NotOwner` or `LimitExceeded`, so clients branch on types, not on message strings.

use prost::Message;
use tonic::{Code, Status};

use crate::google_rpc;
use crate::v1::{BundledError, LimitExceeded, NotOwner};

const TYPE_PREFIX: &str = "type.googleapis.com/";
const NOT_OWNER: &str = "kvfleet.v1.NotOwner";
const LIMIT_EXCEEDED: &str = "kvfleet.v1.LimitExceeded";

fn status_with_detail(code: Code, message: String, type_name: &str, detail: Vec<u8>) -> Status {
    let rich = google_rpc::Status {
        code: code as i32,
        message: message.clone(),
        details: vec![prost_types::Any { type_url: format!("{TYPE_PREFIX}{type_name}"), value: detail }],
    };
    Status::with_details(code, message, rich.encode_to_vec().into())
}

fn find_detail<M: Message + Default>(status: &Status, type_name: &str) -> Option<M> {
    let details = status.details();
    if details.is_empty() {
        return None;
    }
    let rich = google_rpc::Status::decode(details).ok()?;
    rich.details
        .iter()
        .find(|any| any.type_url.strip_prefix(TYPE_PREFIX) == Some(type_name))
        .and_then(|any| M::decode(any.value.as_slice()).ok())
}

/// FAILED_PRECONDITION carrying a `NotOwner` detail.
pub fn not_owner_status(detail: NotOwner) -> Status {
    let message = format!("not owner: {}", detail.reason);
    status_with_detail(Code::FailedPrecondition, message, NOT_OWNER, detail.encode_to_vec())
}

/// The `NotOwner` detail of a status, if it carries one.
pub fn not_owner_detail(status: &Status) -> Option<NotOwner> {
    find_detail(status, NOT_OWNER)
}

/// INVALID_ARGUMENT naming the limit and the size, with a `LimitExceeded` detail.
pub fn limit_status(limit: &str, size: u64, max: u64) -> Status {
    let message = format!("{limit} exceeded: {size} bytes, the limit is {max} bytes");
    let detail = LimitExceeded { limit: limit.to_string(), size, max };
    status_with_detail(Code::InvalidArgument, message, LIMIT_EXCEEDED, detail.encode_to_vec())
}

pub fn limit_detail(status: &Status) -> Option<LimitExceeded> {
    find_detail(status, LIMIT_EXCEEDED)
}

/// A request's status carried inside a `Bundle` answer, details and all.
pub fn bundled_error(status: &Status) -> BundledError {
    BundledError {
        code: status.code() as i32,
        message: status.message().to_string(),
        details: status.details().to_vec().into(),
    }
}

/// The status a bundled request failed with, as if it had been sent alone.
pub fn bundled_status(error: BundledError) -> Status {
    Status::with_details(Code::from_i32(error.code), error.message, error.details)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::RangeDescriptor;

    #[test]
    fn not_owner_round_trips_through_status_details() {
        let detail = NotOwner {
            key: b"k".to_vec().into(),
            node_id: "n1".into(),
            hint: Some(RangeDescriptor { range_id: 7, generation: 3, ..Default::default() }),
            reason: "range 7 moved".into(),
        };
        let status = not_owner_status(detail.clone());
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(not_owner_detail(&status), Some(detail));
        assert_eq!(limit_detail(&status), None);
    }

    #[test]
    fn a_bundled_error_keeps_code_message_and_details() {
        let detail = NotOwner { node_id: "n2".into(), reason: "range 3 split".into(), ..Default::default() };
        let status = bundled_status(bundled_error(&not_owner_status(detail.clone())));
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(status.message(), "not owner: range 3 split");
        assert_eq!(not_owner_detail(&status), Some(detail));
        let plain = bundled_status(bundled_error(&Status::unavailable("node stopping")));
        assert_eq!((plain.code(), plain.message(), plain.details().len()), (Code::Unavailable, "node stopping", 0));
    }

    #[test]
    fn limit_status_names_limit_and_size() {
        let status = limit_status("max_key_bytes", 5000, 4096);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("max_key_bytes"));
        assert!(status.message().contains("5000"));
        assert!(status.message().contains("4096"));
        assert_eq!(limit_detail(&status).map(|d| d.max), Some(4096));
    }

    #[test]
    fn plain_status_has_no_detail() {
        assert_eq!(not_owner_detail(&Status::unavailable("down")), None);
    }
}
