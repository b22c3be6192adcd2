//! The media HTTP listener (HTTP/1.1, hyper): `PUT /m/{id}?…` uploads a blob, `GET` and `HEAD
//! /m/{id}?…` download it (with `Range`). docs/protocol.md#media is the contract.
//!
//! Every resource is bounded: connections ([`MEDIA_CONNECTIONS_MAX`]; more wait in the kernel's
//! accept queue), uploads in progress ([`MEDIA_UPLOADS_IN_FLIGHT_MAX`]; more get 503), the
//! request head ([`MEDIA_HEAD_BYTES_MAX`], [`MEDIA_HEADERS_MAX`], read within
//! [`MEDIA_HEADER_READ_TIMEOUT`]), an upload's silences ([`MEDIA_BODY_IDLE_TIMEOUT`]) and a
//! download's stalls ([`MEDIA_WRITE_STALL_TIMEOUT`]: a reader that takes nothing for that long
//! loses its connection, so slow readers cannot hold every connection slot).

use std::convert::Infallible;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::debug;

use super::url::{Grant, UrlError};
use super::Media;
use ringpost_wire::limits::MEDIA_BYTES_MAX;

/// Connections served at once. Each costs a task and hyper's read buffer (up to
/// [`MEDIA_HEAD_BYTES_MAX`]) plus, while it uploads, its upload's buffer (see
/// [`super::store`]).
pub const MEDIA_CONNECTIONS_MAX: usize = 1024;
/// Uploads in progress at once; more are answered 503 with `Retry-After`. Worst case memory:
/// this many times an upload's buffer (256 KiB local; up to 15 MiB to S3).
pub const MEDIA_UPLOADS_IN_FLIGHT_MAX: usize = 32;
/// hyper's read buffer, which bounds a request head (431 beyond) and the size of the body
/// chunks an upload is read in.
pub const MEDIA_HEAD_BYTES_MAX: usize = 64 * 1024;
/// Headers in one request.
pub const MEDIA_HEADERS_MAX: usize = 32;
/// Time a client has to send its request head.
pub const MEDIA_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// An upload that sends nothing for this long is abandoned (nothing is stored).
pub const MEDIA_BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection whose writes have been blocked (the client reads nothing) for this long is
/// closed (the default of [`MediaConfig::write_stall_ms`](super::MediaConfig)). Checked six
/// times per timeout, so a stall is cut within 7/6 of it.
pub const MEDIA_WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(30);

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// Serves the media listener until it fails.
pub async fn serve(listener: TcpListener, media: Arc<Media>) {
    let connections = Arc::new(Semaphore::new(MEDIA_CONNECTIONS_MAX));
    let uploads = Arc::new(Semaphore::new(MEDIA_UPLOADS_IN_FLIGHT_MAX));
    loop {
        let Ok(permit) = connections.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "media accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let media = media.clone();
        let uploads = uploads.clone();
        tokio::spawn(async move {
            let stall_max = Duration::from_millis(media.config.write_stall_ms.max(1));
            let watcher = media.clone();
            let service = hyper::service::service_fn(move |req| {
                let media = media.clone();
                let uploads = uploads.clone();
                async move { Ok::<_, Infallible>(handle(&media, &uploads, req).await) }
            });
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(MEDIA_HEADER_READ_TIMEOUT)
                .max_buf_size(MEDIA_HEAD_BYTES_MAX)
                .max_headers(MEDIA_HEADERS_MAX);
            let (io, stalled) = Watched::new(tcp);
            let conn = http.serve_connection(TokioIo::new(io), service);
            tokio::pin!(conn);
            let mut check = tokio::time::interval((stall_max / 6).max(Duration::from_millis(100)));
            loop {
                tokio::select! {
                    ended = &mut conn => {
                        if let Err(e) = ended {
                            debug!(%peer, error = %e, "media connection ended with an error");
                        }
                        break;
                    }
                    _ = check.tick() => {
                        if stalled.for_longer_than(stall_max) {
                            debug!(%peer, "media connection closed: the client read nothing for \
                                {stall_max:?}");
                            watcher.metrics.write_stalls.fetch_add(1, Relaxed);
                            break;
                        }
                    }
                }
            }
            drop(permit);
        });
    }
}

/// Since when a connection's writes have been blocked, if they are (milliseconds after its
/// start, plus one; 0: not blocked).
#[derive(Clone)]
struct Stalled {
    start: std::time::Instant,
    since: Arc<std::sync::atomic::AtomicU64>,
}

impl Stalled {
    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64 + 1
    }

    fn for_longer_than(&self, limit: Duration) -> bool {
        let since = self.since.load(Relaxed);
        since != 0 && self.now().saturating_sub(since) > limit.as_millis() as u64
    }
}

/// A connection that records when its writes block ([`Stalled`]).
struct Watched {
    io: tokio::net::TcpStream,
    stalled: Stalled,
}

impl Watched {
    fn new(io: tokio::net::TcpStream) -> (Watched, Stalled) {
        let stalled = Stalled {
            start: std::time::Instant::now(),
            since: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        };
        let watched = Watched {
            io,
            stalled: stalled.clone(),
        };
        (watched, stalled)
    }

    fn note<T>(&self, poll: &std::task::Poll<T>) {
        if poll.is_pending() {
            if self.stalled.since.load(Relaxed) == 0 {
                self.stalled.since.store(self.stalled.now(), Relaxed);
            }
        } else {
            self.stalled.since.store(0, Relaxed);
        }
    }
}

impl tokio::io::AsyncRead for Watched {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Watched {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let poll = std::pin::Pin::new(&mut self.io).poll_write(cx, buf);
        self.note(&poll);
        poll
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let poll = std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.note(&poll);
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let poll = std::pin::Pin::new(&mut self.io).poll_flush(cx);
        self.note(&poll);
        poll
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Answers one request.
pub async fn handle(media: &Media, uploads: &Semaphore, req: Request<Incoming>) -> Response<Body> {
    let Some(id) = req.uri().path().strip_prefix("/m/") else {
        return text(
            StatusCode::NOT_FOUND,
            "no such resource; media URLs are /m/<id>?…",
        );
    };
    let id = id.to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    match *req.method() {
        Method::PUT => put(media, uploads, &id, &query, req).await,
        Method::GET | Method::HEAD => get(media, &id, &query, req).await,
        _ => {
            let mut r = text(
                StatusCode::METHOD_NOT_ALLOWED,
                "media URLs take PUT, GET and HEAD",
            );
            set(&mut r, header::ALLOW, "PUT, GET, HEAD");
            r
        }
    }
}

fn denied(media: &Media, e: UrlError) -> Response<Body> {
    media.metrics.denied.fetch_add(1, Relaxed);
    match e {
        UrlError::BadId => text(StatusCode::NOT_FOUND, &e.to_string()),
        _ => text(StatusCode::FORBIDDEN, &e.to_string()),
    }
}

/// Bytes of a refused upload's body read and dropped before the answer, when its URL was
/// not valid (or the node is busy): a client that sends a small body reads the answer instead
/// of a reset connection; a larger one gets the reset.
pub const REFUSED_BODY_DRAIN_BYTES_MAX: u64 = 1024 * 1024;

/// Reads and drops what is left of `body`, up to `max` bytes, so the answer reaches a client
/// still sending (HTTP/1.1 clients rarely read before they finished writing).
async fn drain(body: &mut Incoming, max: u64) {
    let mut read: u64 = 0;
    while read <= max {
        match tokio::time::timeout(MEDIA_BODY_IDLE_TIMEOUT, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                read += frame.data_ref().map_or(0, |d| d.len() as u64);
            }
            _ => return,
        }
    }
}

async fn put(
    media: &Media,
    uploads: &Semaphore,
    id: &str,
    query: &str,
    req: Request<Incoming>,
) -> Response<Body> {
    let (parts, mut body) = req.into_parts();
    let size = match media.signer().verify(id, query, true, media.now_ms()) {
        Ok(Grant::Upload { size, .. }) => size,
        Ok(Grant::Download { .. }) => {
            drain(&mut body, REFUSED_BODY_DRAIN_BYTES_MAX).await;
            return text(StatusCode::FORBIDDEN, "not an upload URL");
        }
        Err(e) => {
            drain(&mut body, REFUSED_BODY_DRAIN_BYTES_MAX).await;
            return denied(media, e);
        }
    };
    let answer = receive(media, uploads, id, size, &parts.headers, &mut body).await;
    match answer.status() {
        // A granted client sent the wrong bytes: let it read why (its body is at most what
        // it was granted, or the request is cut off there).
        StatusCode::BAD_REQUEST => drain(&mut body, MEDIA_BYTES_MAX).await,
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::INSUFFICIENT_STORAGE => {
            drain(&mut body, REFUSED_BODY_DRAIN_BYTES_MAX).await
        }
        _ => {}
    }
    answer
}

/// Streams a granted upload of `size` bytes into the store and commits it if it is right.
async fn receive(
    media: &Media,
    uploads: &Semaphore,
    id: &str,
    size: u64,
    headers: &hyper::HeaderMap,
    body: &mut Incoming,
) -> Response<Body> {
    let refuse = |status: StatusCode, message: String| {
        media.metrics.uploads_refused.fetch_add(1, Relaxed);
        text(status, &message)
    };
    if !media.has_room(size) {
        return refuse(
            StatusCode::INSUFFICIENT_STORAGE,
            "this node's media storage is full; nothing stored, try again later".into(),
        );
    }
    if let Some(v) = headers.get(header::CONTENT_LENGTH) {
        match v.to_str().ok().and_then(|v| v.parse::<u64>().ok()) {
            Some(n) if n == size => {}
            Some(n) => {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "Content-Length is {n} bytes but the grant is for {size}; nothing stored"
                    ),
                )
            }
            None => return refuse(StatusCode::BAD_REQUEST, "invalid Content-Length".into()),
        }
    }
    let Ok(_slot) = uploads.try_acquire() else {
        let mut r = text(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many uploads in progress on this node; retry shortly",
        );
        set(&mut r, header::RETRY_AFTER, "1");
        return r;
    };
    let mut upload = match media.store().begin(id, size).await {
        Ok(u) => u,
        Err(e) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}")),
    };
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    let mut got: u64 = 0;
    loop {
        let frame = match tokio::time::timeout(MEDIA_BODY_IDLE_TIMEOUT, body.frame()).await {
            Ok(None) => break,
            Ok(Some(Ok(frame))) => frame,
            Ok(Some(Err(e))) => {
                upload.abort().await;
                return refuse(
                    StatusCode::BAD_REQUEST,
                    format!("reading the body failed: {e}; nothing stored"),
                );
            }
            Err(_) => {
                upload.abort().await;
                return refuse(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "no body data for {} s; nothing stored",
                        MEDIA_BODY_IDLE_TIMEOUT.as_secs()
                    ),
                );
            }
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        got = got.saturating_add(data.len() as u64);
        if got > size {
            upload.abort().await;
            return refuse(
                StatusCode::BAD_REQUEST,
                format!("the body is longer than the granted {size} bytes; nothing stored"),
            );
        }
        hash.update(&data);
        if let Err(e) = upload.write(&data).await {
            upload.abort().await;
            return refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("{e}; nothing stored"),
            );
        }
    }
    if got != size {
        upload.abort().await;
        return refuse(
            StatusCode::BAD_REQUEST,
            format!("the body is {got} bytes but the grant is for {size}; nothing stored"),
        );
    }
    let digest = hex::encode(hash.finish());
    if digest != id {
        upload.abort().await;
        return refuse(
            StatusCode::BAD_REQUEST,
            format!("the body's SHA-256 is {digest}, not the granted {id}; nothing stored"),
        );
    }
    match upload.commit(media.now_ms()).await {
        Ok(()) => {
            media.metrics.uploads_stored.fetch_add(1, Relaxed);
            media.metrics.bytes_uploaded.fetch_add(size, Relaxed);
            text(StatusCode::CREATED, &format!("stored {id}"))
        }
        Err(e) => refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("committing the upload failed: {e}"),
        ),
    }
}

/// What a `Range` header asks of a blob of a given size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// No (usable) range: the whole blob, 200.
    Whole,
    /// Bytes `start..=end`, 206.
    Part { start: u64, end: u64 },
    /// Starts at or past the end: 416.
    Unsatisfiable,
}

/// Parses a `Range` header for a blob of `size` (> 0) bytes. One range of bytes is served; a
/// header that is not one well-formed byte range (several ranges, another unit, garbage) is
/// ignored, as RFC 9110 allows, and the whole blob is served.
pub fn byte_range(header: &str, size: u64) -> ByteRange {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return ByteRange::Whole;
    };
    let Some((first, last)) = spec.trim().split_once('-') else {
        return ByteRange::Whole;
    };
    let number = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (first.is_empty(), number(first), number(last)) {
        // bytes=-N: the last N bytes.
        (true, _, Some(n)) => {
            if n == 0 {
                ByteRange::Unsatisfiable
            } else {
                ByteRange::Part {
                    start: size.saturating_sub(n),
                    end: size - 1,
                }
            }
        }
        (false, Some(start), end) if last.is_empty() || end.is_some() => {
            let end = end.unwrap_or(u64::MAX);
            if end < start {
                ByteRange::Whole
            } else if start >= size {
                ByteRange::Unsatisfiable
            } else {
                ByteRange::Part {
                    start,
                    end: end.min(size - 1),
                }
            }
        }
        _ => ByteRange::Whole,
    }
}

async fn get(media: &Media, id: &str, query: &str, req: Request<Incoming>) -> Response<Body> {
    if let Err(e) = media.signer().verify(id, query, false, media.now_ms()) {
        return denied(media, e);
    }
    let size = match media.store().size(id).await {
        Ok(Some(size)) => size,
        Ok(None) => {
            return text(
                StatusCode::NOT_FOUND,
                "no such media: it expired or was never uploaded",
            )
        }
        Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    };
    let range = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map_or(ByteRange::Whole, |v| byte_range(v, size));
    let (status, start, len) = match range {
        ByteRange::Whole => (StatusCode::OK, 0, size),
        ByteRange::Part { start, end } => (StatusCode::PARTIAL_CONTENT, start, end - start + 1),
        ByteRange::Unsatisfiable => {
            let mut r = text(
                StatusCode::RANGE_NOT_SATISFIABLE,
                &format!("the range is outside the blob's {size} bytes"),
            );
            set(&mut r, header::CONTENT_RANGE, &format!("bytes */{size}"));
            return r;
        }
    };
    let body = if req.method() == Method::HEAD {
        empty()
    } else {
        match media.store().read(id, start, len).await {
            Ok(stream) => {
                media.metrics.bytes_downloaded.fetch_add(len, Relaxed);
                StreamBody::new(stream.map(|chunk| chunk.map(Frame::data))).boxed_unsync()
            }
            Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        }
    };
    let mut r = Response::new(body);
    *r.status_mut() = status;
    set(&mut r, header::CONTENT_TYPE, "application/octet-stream");
    set(&mut r, header::CONTENT_LENGTH, &len.to_string());
    set(&mut r, header::ACCEPT_RANGES, "bytes");
    set(&mut r, header::ETAG, &format!("\"{id}\""));
    if status == StatusCode::PARTIAL_CONTENT {
        set(
            &mut r,
            header::CONTENT_RANGE,
            &format!("bytes {start}-{}/{size}", start + len - 1),
        );
    }
    r
}

fn empty() -> Body {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn text(status: StatusCode, message: &str) -> Response<Body> {
    let body = Full::new(Bytes::from(format!("{message}\n")))
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut r = Response::new(body);
    *r.status_mut() = status;
    set(&mut r, header::CONTENT_TYPE, "text/plain; charset=utf-8");
    r
}

fn set(r: &mut Response<Body>, name: HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        r.headers_mut().insert(name, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_ranges() {
        use ByteRange::*;
        assert_eq!(byte_range("bytes=0-9", 100), Part { start: 0, end: 9 });
        assert_eq!(byte_range("bytes=90-", 100), Part { start: 90, end: 99 });
        assert_eq!(
            byte_range("bytes=90-1000", 100),
            Part { start: 90, end: 99 }
        );
        assert_eq!(byte_range("bytes=-10", 100), Part { start: 90, end: 99 });
        assert_eq!(byte_range("bytes=-1000", 100), Part { start: 0, end: 99 });
        assert_eq!(byte_range("bytes=100-", 100), Unsatisfiable);
        assert_eq!(byte_range("bytes=-0", 100), Unsatisfiable);
        for ignored in [
            "bytes=5-1",
            "bytes=0-1,5-6",
            "items=0-1",
            "bytes=a-b",
            "bytes=-",
            "bytes=+1-2",
            "",
        ] {
            assert_eq!(byte_range(ignored, 100), Whole, "{ignored}");
        }
        assert_eq!(byte_range("bytes=99999999999999999999999-", 100), Whole);
    }
}
