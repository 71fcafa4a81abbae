//! Request bodies and keep-alive.
//!
//! hyper keeps an HTTP/1.1 connection open for the client's next request only once the
//! current request's body has been read to its end. A handler that answers without
//! reading it (a 501, a 401 from the auth check, a 404 for an unknown sandbox) makes
//! hyper drain what has already arrived and, if the body's last bytes are still on the
//! wire, close the connection after the answer, without saying so. A pooling client
//! (httpx, in the E2B SDK) then sends its next request into a closed connection and
//! gets "Server disconnected without sending a response".
//!
//! So REST requests are read whole, up to [`crate::MAX_BODY`], before routing
//! ([`read_whole`]), and sandbox traffic, which streams, announces `Connection: close`
//! when the proxy answered without reading the body to its end ([`Watched`]).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, LengthLimitError, Limited};

use crate::error::ApiError;

/// `req` with its body read into memory, or the error answer: 413 above `limit` (and
/// `Connection: close`, since the rest of the body stays unread), 400 if the client
/// stopped sending. A `Content-Length` above `limit` is refused before any of the body
/// is read.
pub async fn read_whole(req: Request, limit: usize) -> Result<Request, Response> {
    let too_large = || {
        closing(
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body exceeds {limit} bytes"),
            )
            .into_response(),
        )
    };
    let (parts, body) = req.into_parts();
    if body.size_hint().lower() > limit as u64 {
        return Err(too_large());
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(Request::from_parts(parts, Body::from(collected.to_bytes()))),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Err(e) => Err(closing(
            ApiError::bad_request(format!("cannot read the request body: {e}")).into_response(),
        )),
    }
}

/// Whether a [`Watched`] body was read to its end. (Not `Clone`: whether the body is
/// gone is told by the count of references.)
#[derive(Debug)]
pub struct BodyRead(Arc<AtomicBool>);

impl BodyRead {
    /// `resp`, with `Connection: close` if the body was dropped before its end: hyper
    /// will close the connection after `resp` anyway, and the client must know.
    pub fn close_if_unread(&self, resp: Response) -> Response {
        let dropped = Arc::strong_count(&self.0) == 1;
        if dropped && !self.0.load(Ordering::Acquire) {
            closing(resp)
        } else {
            resp
        }
    }
}

/// A request body that records reaching its end in a [`BodyRead`].
#[derive(Debug)]
pub struct Watched {
    inner: Body,
    read: Arc<AtomicBool>,
}

impl Watched {
    /// `req` with its body watched.
    pub fn request(req: Request) -> (Request, BodyRead) {
        let (parts, inner) = req.into_parts();
        let read = Arc::new(AtomicBool::new(inner.is_end_stream()));
        let body = Watched {
            inner,
            read: read.clone(),
        };
        (Request::from_parts(parts, Body::new(body)), BodyRead(read))
    }
}

impl HttpBody for Watched {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.read.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn closing(mut resp: Response) -> Response {
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post(body: &'static str) -> Request {
        Request::post("/x").body(Body::from(body)).unwrap()
    }

    #[tokio::test]
    async fn a_whole_body_within_the_limit_is_kept() {
        let req = read_whole(post("{\"a\":1}"), 16).await.unwrap();
        let bytes = req.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"{\"a\":1}");
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_413_and_closes() {
        let resp = read_whole(post("0123456789abcdefg"), 16).await.unwrap_err();
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(resp.headers()[header::CONNECTION], "close");
    }

    #[tokio::test]
    async fn an_answer_without_reading_the_body_closes_the_connection() {
        let (req, read) = Watched::request(post("unread"));
        drop(req);
        let resp = read.close_if_unread(StatusCode::NOT_FOUND.into_response());
        assert_eq!(resp.headers()[header::CONNECTION], "close");
    }

    #[tokio::test]
    async fn an_answer_after_reading_the_body_keeps_the_connection() {
        let (req, read) = Watched::request(post("read"));
        req.into_body().collect().await.unwrap();
        let resp = read.close_if_unread(StatusCode::OK.into_response());
        assert!(resp.headers().get(header::CONNECTION).is_none());

        let (req, read) = Watched::request(Request::get("/").body(Body::empty()).unwrap());
        drop(req);
        let resp = read.close_if_unread(StatusCode::NOT_FOUND.into_response());
        assert!(resp.headers().get(header::CONNECTION).is_none());
    }
}
