//! Message size limits per method of the AssociationService. tonic decodes
//! under one limit per service, but a batch (up to 10,000 requests) needs a
//! far larger one than a single deletion, whose handler refuses anything
//! over 4 KiB and whose decoding guard stays small. Two copies of the
//! service, each with its limit, and this router between them by path.

use std::task::{Context, Poll};

use tonic::server::NamedService;
use tower::Service;

/// Largest BatchDeleteAssociations message decoded at all: 10,000 requests
/// of a typical ~100 bytes are 1 MB; this leaves room for long identifiers.
pub(super) const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;

const BATCH_PATH: &str = "/infobip.provisioning.v1.AssociationService/BatchDeleteAssociations";

/// The service with `batch` for BatchDeleteAssociations, `single` for the rest.
#[derive(Clone)]
pub(super) struct ByMethod<S> {
    pub(super) single: S,
    pub(super) batch: S,
}

impl<S: NamedService> NamedService for ByMethod<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for ByMethod<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match self.single.poll_ready(cx)? {
            Poll::Ready(()) => self.batch.poll_ready(cx),
            Poll::Pending => Poll::Pending,
        }
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() == BATCH_PATH {
            self.batch.call(request)
        } else {
            self.single.call(request)
        }
    }
}
