//! Admin-call authentication: a cluster's nodes share one admin token (Kubernetes: a Secret the
//! operator derives per cluster); every admin call carries it as `authorization: Bearer <token>`
//! and a node that has a token refuses admin calls without it. A node without one (the
//! playground) accepts every admin call.

use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request, Status};

/// The shortest token a node accepts: 128 bits in hex.
pub const MIN_TOKEN_CHARS: usize = 32;

/// The token a caller sends, if its cluster has one.
#[derive(Clone, Default)]
pub struct AdminToken(Option<Arc<str>>);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "AdminToken(set)" } else { "AdminToken(none)" })
    }
}

impl AdminToken {
    pub fn none() -> Self {
        AdminToken(None)
    }

    /// A token; refused if it is shorter than `MIN_TOKEN_CHARS` or cannot travel in a header.
    pub fn new(token: &str) -> Result<Self, String> {
        let token = token.trim();
        if token.len() < MIN_TOKEN_CHARS {
            return Err(format!("the admin token has {} characters; it needs at least {MIN_TOKEN_CHARS}", token.len()));
        }
        MetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| "the admin token must be printable ASCII (it travels in a header)".to_string())?;
        Ok(AdminToken(Some(token.into())))
    }

    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }

    /// Adds the token to an outgoing admin call.
    pub fn attach<T>(&self, request: &mut Request<T>) {
        if let Some(token) = &self.0
            && let Ok(value) = MetadataValue::try_from(format!("Bearer {token}"))
        {
            request.metadata_mut().insert("authorization", value);
        }
    }

    /// Checks an incoming admin call: it must carry this token, if there is one.
    pub fn verify(&self, metadata: &MetadataMap) -> Result<(), Status> {
        let Some(expected) = &self.0 else { return Ok(()) };
        let presented =
            metadata.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        match presented {
            None => Err(Status::unauthenticated(
                "admin calls to this node need the cluster's admin token (authorization: Bearer <token>); only \
                 the cluster's operator and its nodes have it",
            )),
            Some(token) if bool::from(token.as_bytes().ct_eq(expected.as_bytes())) => Ok(()),
            Some(_) => Err(Status::unauthenticated(
                "the admin token does not match this node's (a token of another cluster, or an old one)",
            )),
        }
    }
}

/// Attaches an `AdminToken` to every call of a client (`AdminClient::with_interceptor`).
impl tonic::service::Interceptor for AdminToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        self.attach(&mut request);
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn a_node_with_a_token_admits_only_calls_that_carry_it() {
        let token = AdminToken::new(TOKEN).unwrap();
        let mut carried = Request::new(());
        token.attach(&mut carried);
        assert!(token.verify(carried.metadata()).is_ok());
        let bare = Request::new(());
        assert_eq!(token.verify(bare.metadata()).unwrap_err().code(), tonic::Code::Unauthenticated);
        let mut wrong = Request::new(());
        AdminToken::new(&TOKEN.replace('0', "1")).unwrap().attach(&mut wrong);
        let refused = token.verify(wrong.metadata()).unwrap_err();
        assert!(refused.message().contains("does not match"), "{}", refused.message());
        assert!(AdminToken::none().verify(bare.metadata()).is_ok(), "no token: open (the playground)");
    }

    #[test]
    fn short_or_unprintable_tokens_are_refused() {
        assert!(AdminToken::new("short").unwrap_err().contains("at least 32"));
        assert!(AdminToken::new(&format!("{TOKEN}\u{7f}x")).is_err());
    }
}
