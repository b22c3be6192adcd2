//! Thin IO drivers that turn bytes into frames and back. Every transport feeds the same
//! [`crate::conn`] driver and [`crate::session::Session`].
//!
//! Idle connections own no read buffer: a driver waits for readiness, reads into a buffer that
//! belongs to the worker thread ([`with_read_buf`]), and keeps only the leftover of a partial
//! frame, allocated only while there is one. Outgoing frames are queued as `Bytes` and written
//! vectored, so the queue is empty (and unallocated) when idle.

pub mod cipher;
pub mod quic;
pub mod tls;
// The one module with `unsafe`: io_uring's buffers and descriptors (each block says why it is
// sound).
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub mod uring;
pub mod ws;
pub mod wss;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;

use bytes::Bytes;
use ringpost_wire::ErrorCode;

/// Size of each worker thread's read buffer. One per thread, not per connection.
pub const READ_BUF_BYTES: usize = 64 * 1024;

/// A connection that stops reading our writes for this long is dropped (it holds our queue).
pub const WRITE_TIMEOUT_MS: u64 = 30_000;

thread_local! {
    static READ_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; READ_BUF_BYTES].into_boxed_slice());
}

/// Runs `f` with this thread's read buffer. Never hold it across an `.await`.
pub fn with_read_buf<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    READ_BUF.with(|b| f(&mut b.borrow_mut()))
}

/// Why a transport gave up.
/// What [`Transport::next_frame`] read.
#[derive(Debug)]
pub enum Incoming {
    /// One frame.
    Frame(Bytes),
    /// The peer closed the connection.
    Closed,
    /// No frame, but the transport queued control output (e.g. a WebSocket `Pong`) for the
    /// next write: write, then read on.
    Control,
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The peer broke the transport's framing; the stream cannot be trusted any more.
    #[error("{message}")]
    Protocol { code: ErrorCode, message: String },
    #[error("write timed out")]
    WriteTimeout,
}

/// What the connection driver needs from a transport.
pub trait Transport: Send {
    /// Polls for the next complete frame (encoded flatbuffer bytes), the peer's close, or word
    /// that control output is waiting ([`Transport::has_control_output`]); `Pending` registers
    /// `cx`'s waker for the socket's readiness.
    ///
    /// A poll function rather than a future, so a connection waiting to read keeps no read
    /// future at all (the waker is registered with the socket): what an idle connection costs
    /// is its state, not the state of nested read futures. Loses nothing when not polled again
    /// and never writes (a half-written control frame cannot be left behind).
    fn poll_next_frame(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<Incoming, TransportError>>;

    /// [`Transport::poll_next_frame`] as a future.
    fn next_frame(&mut self) -> impl Future<Output = Result<Incoming, TransportError>> + Send {
        std::future::poll_fn(move |cx| self.poll_next_frame(cx))
    }

    /// Whether the transport has control output of its own (e.g. a WebSocket `Pong`) waiting
    /// for the next [`Transport::write`], which the driver then calls even with no frames.
    fn has_control_output(&self) -> bool {
        false
    }

    /// Writes every queued frame, in order, emptying the queue (and any control output).
    fn write(
        &mut self,
        frames: &mut VecDeque<Bytes>,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Closes the transport; `error` says why when it is a protocol violation.
    fn close(&mut self, error: Option<(ErrorCode, &str)>) -> impl Future<Output = ()> + Send;
}
