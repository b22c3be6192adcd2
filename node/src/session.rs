//! The per-connection state machine, sans-IO.
//!
//! A [`Session`] takes decoded frames, service results and `now_ms`, and returns [`Step`]s for
//! its driver ([`crate::conn`]) to carry out: frames to write, service requests to execute, a
//! close. It owns no socket and no timer, so every protocol rule here is unit-tested without a
//! network. The driver is shared by every transport (WebSocket, WebSocket over TLS, QUIC).
//!
//! What lives here: the handshake (`Hello` first, version check, authentication gating), which
//! frames are allowed in which state, the delivery window (how many `Deliver`s are in flight and
//! where the drain cursor is), and keepalive bookkeeping. What does not: anything that touches
//! storage or other connections; that is [`crate::server`].

use ringpost_wire::{
    limits, Auth, Body, DeliverAck, DeviceId, Direction, ErrorCode, Frame, Pong, UserId, Welcome,
};

use crate::inbox::EntryHeader;

/// Deliveries in flight (sent, not yet acked) per device. Each is an inbox entry the device
/// will ack; the window bounds what a slow device makes the node hold and re-send. Worst case
/// per connection: this many (seq, entry header) pairs in the in-flight set (48 bytes each,
/// 3 KiB in all), allocated only while some are in flight.
pub const DELIVER_WINDOW: u32 = 64;

/// How often a client should ping while idle.
pub const PING_INTERVAL_MS: u32 = 30_000;

/// A connection silent for this long is reaped (half-open TCP, vanished phones).
pub const IDLE_TIMEOUT_MS: u32 = 90_000;

/// Requests a session may have outstanding at the driver (executing or queued). When reached,
/// the driver stops reading the connection until one completes: back-pressure, not buffering.
pub const REQUESTS_IN_FLIGHT_MAX: usize = 64;

/// Keepalive settings a node announces in `Welcome` and enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// How often a client should ping while idle.
    pub ping_interval_ms: u32,
    /// A connection silent for this long is closed.
    pub idle_timeout_ms: u32,
}

impl Default for Keepalive {
    fn default() -> Self {
        Keepalive {
            ping_interval_ms: PING_INTERVAL_MS,
            idle_timeout_ms: IDLE_TIMEOUT_MS,
        }
    }
}

/// Who is on the other end, once known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// `Hello` not yet received.
    New,
    /// `Hello` without credentials: may register or link a device, nothing else.
    Anonymous,
    /// `Hello` with credentials sent to the server, answer pending.
    Authenticating,
    /// An authenticated device.
    Device { user: UserId, device: DeviceId },
    /// The session is over; the driver closes the transport.
    Closed,
}

/// A service operation the driver must execute for this session. `req` is echoed in the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Authenticate(Auth),
    /// Anything an anonymous connection may ask: register, verify, link.
    Anonymous(Body),
    /// Anything an authenticated device may ask; the driver checks nothing further about who.
    Device {
        user: UserId,
        device: DeviceId,
        body: Body,
    },
}

/// One thing the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Write this frame.
    Write(Frame),
    /// Execute a request and feed the answer back through [`Session::handle_answer`].
    Execute { req: u32, request: Request },
    /// Write this error frame, then close the transport.
    Close(Frame),
    /// Acknowledge these inbox entries of the session's device; answered only if it fails
    /// (an `Error` for `req`), and not in line with other answers: nothing waits for it.
    Ack {
        req: u32,
        user: UserId,
        device: DeviceId,
        /// Each seq with the header of its entry when this connection delivered it.
        seqs: Vec<(u64, Option<EntryHeader>)>,
    },
}

/// What the server made of a request, fed back to the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Reply with these frames (usually one).
    Frames(Vec<Frame>),
    /// The connection is now this device (authentication succeeded, or a device was registered
    /// or linked on this connection); reply with these frames.
    Authenticated {
        user: UserId,
        device: DeviceId,
        frames: Vec<Frame>,
    },
    /// Reply with this error; if fatal, close.
    Error {
        code: ErrorCode,
        message: String,
        retry_after_ms: u32,
    },
    /// Another node owns the user this request is about: reply `Redirect` and close, so the
    /// client reconnects to the owner.
    Redirect(ringpost_wire::Redirect),
}

/// Where the drain of this device's inbox stands.
#[derive(Debug, Default)]
struct DeliverWindow {
    /// Highest seq handed to the device (every entry up to here was read once).
    cursor: u64,
    /// Seqs sent but not acked, ascending, with what an ack of each needs to know. Bounded by
    /// [`DELIVER_WINDOW`]; freed when empty.
    in_flight: Vec<(u64, EntryHeader)>,
    /// A fetch is outstanding at the driver.
    fetching: bool,
    /// New entries may exist past `cursor` (set by a wake-up, cleared when a fetch comes back
    /// short).
    more: bool,
}

/// The per-connection protocol state. Small on purpose: it lives as long as the connection.
#[derive(Debug)]
pub struct Session {
    peer: Peer,
    last_rx_ms: u64,
    node_id: u64,
    epoch: u64,
    keepalive: Keepalive,
    /// Present only for authenticated devices.
    window: Option<Box<DeliverWindow>>,
}

impl Session {
    pub fn new(now_ms: u64, node_id: u64, epoch: u64, keepalive: Keepalive) -> Self {
        Session {
            peer: Peer::New,
            last_rx_ms: now_ms,
            node_id,
            epoch,
            keepalive,
            window: None,
        }
    }

    pub fn peer(&self) -> Peer {
        self.peer
    }

    pub fn is_closed(&self) -> bool {
        self.peer == Peer::Closed
    }

    /// A frame arrived (already decoded by the transport driver).
    pub fn handle_frame(&mut self, frame: Frame, now_ms: u64) -> Vec<Step> {
        self.last_rx_ms = now_ms;
        let Frame { req, body } = frame;
        match (self.peer, body) {
            (Peer::Closed, _) => Vec::new(),
            (_, Body::Ping(ping)) => vec![Step::Write(Frame::new(req, Pong { nonce: ping.nonce }))],
            (Peer::New, Body::Hello(hello)) => {
                if hello.protocol_version != limits::PROTOCOL_VERSION {
                    return self.fatal(
                        req,
                        ErrorCode::UnsupportedVersion,
                        format!(
                            "protocol version {} is not supported; this node speaks {}",
                            hello.protocol_version,
                            limits::PROTOCOL_VERSION
                        ),
                    );
                }
                match hello.auth {
                    None => {
                        self.peer = Peer::Anonymous;
                        vec![Step::Write(Frame::new(req, self.welcome(now_ms)))]
                    }
                    Some(auth) => {
                        self.peer = Peer::Authenticating;
                        vec![Step::Execute {
                            req,
                            request: Request::Authenticate(auth),
                        }]
                    }
                }
            }
            (Peer::New, other) => self.fatal(
                req,
                ErrorCode::UnexpectedFrame,
                format!("the first frame must be Hello, got {}", other.name()),
            ),
            (_, Body::Hello(_)) => self.fatal(
                req,
                ErrorCode::UnexpectedFrame,
                "Hello was already received".into(),
            ),
            (Peer::Authenticating, other) => self.fatal(
                req,
                ErrorCode::UnexpectedFrame,
                format!("{} sent before authentication completed", other.name()),
            ),
            (Peer::Anonymous, body) => match body {
                Body::RegisterRequest(_) | Body::RegisterVerify(_) | Body::LinkDevice(_) => {
                    vec![Step::Execute {
                        req,
                        request: Request::Anonymous(body),
                    }]
                }
                other if is_client_frame(&other) => vec![Step::Write(error_frame(
                    req,
                    ErrorCode::Unauthenticated,
                    format!("{} needs an authenticated connection", other.name()),
                    0,
                ))],
                other => self.not_client_frame(req, &other),
            },
            (Peer::Device { user, device }, body) => match body {
                Body::DeliverAck(ack) => self.handle_deliver_ack(req, user, device, ack),
                Body::RegisterRequest(_) | Body::RegisterVerify(_) | Body::LinkDevice(_) => {
                    vec![Step::Write(error_frame(
                        req,
                        ErrorCode::UnexpectedFrame,
                        "this connection is already a registered device".into(),
                        0,
                    ))]
                }
                other if is_client_frame(&other) => {
                    vec![Step::Execute {
                        req,
                        request: Request::Device {
                            user,
                            device,
                            body: other,
                        },
                    }]
                }
                other => self.not_client_frame(req, &other),
            },
        }
    }

    /// A frame could not be decoded. The transport kept its framing (the length or the
    /// WebSocket message was sound), so the stream is still trustworthy unless `fatal`.
    /// `req` is the frame's request id when it could still be read, else 0.
    pub fn handle_bad_frame(&mut self, req: u32, code: ErrorCode, message: String) -> Vec<Step> {
        if code.is_fatal() || self.peer == Peer::New {
            self.fatal(req, code, message)
        } else {
            vec![Step::Write(error_frame(req, code, message, 0))]
        }
    }

    /// The driver executed a request.
    pub fn handle_answer(&mut self, req: u32, answer: Answer) -> Vec<Step> {
        match answer {
            Answer::Frames(frames) => frames
                .into_iter()
                .map(|f| Step::Write(reply(req, f)))
                .collect(),
            Answer::Authenticated {
                user,
                device,
                frames,
            } => {
                let was_authenticating = self.peer == Peer::Authenticating;
                self.peer = Peer::Device { user, device };
                self.window = Some(Box::new(DeliverWindow {
                    more: true,
                    ..Default::default()
                }));
                let mut steps = Vec::with_capacity(frames.len() + 1);
                if was_authenticating {
                    steps.push(Step::Write(Frame::new(req, self.welcome(self.last_rx_ms))));
                }
                steps.extend(frames.into_iter().map(|f| Step::Write(reply(req, f))));
                steps
            }
            Answer::Redirect(redirect) => {
                self.peer = Peer::Closed;
                self.window = None;
                vec![Step::Close(Frame::new(req, redirect))]
            }
            Answer::Error {
                code,
                message,
                retry_after_ms,
            } => {
                if code.is_fatal() || self.peer == Peer::Authenticating {
                    self.fatal(req, code, message)
                } else {
                    vec![Step::Write(error_frame(req, code, message, retry_after_ms))]
                }
            }
        }
    }

    /// New inbox entries may exist for this device.
    pub fn handle_wake(&mut self) {
        if let Some(w) = self.window.as_deref_mut() {
            w.more = true;
        }
    }

    /// If the device should be sent more entries, the range to read: `(after_seq, limit)`.
    /// The driver reads them and calls [`Session::handle_fetched`].
    pub fn poll_fetch(&mut self) -> Option<(u64, usize)> {
        let w = self.window.as_deref_mut()?;
        let room = DELIVER_WINDOW as usize - w.in_flight.len();
        if w.fetching || !w.more || room == 0 {
            return None;
        }
        w.fetching = true;
        Some((w.cursor, room))
    }

    /// The driver read these entries (ascending seqs, with their headers) from the inbox for the
    /// range of the last [`Session::poll_fetch`]; it writes their `Deliver` frames.
    pub fn handle_fetched(&mut self, fetched: &[(u64, EntryHeader)], limit: usize) {
        let Some(w) = self.window.as_deref_mut() else {
            return;
        };
        w.fetching = false;
        debug_assert!(
            fetched.windows(2).all(|p| p[0].0 < p[1].0),
            "inbox reads are ordered"
        );
        for &(seq, header) in fetched {
            if seq > w.cursor {
                w.cursor = seq;
                w.in_flight.push((seq, header));
            }
        }
        // A short read means the inbox is drained up to now; a wake-up sets `more` again.
        if fetched.len() < limit {
            w.more = false;
        }
    }

    /// A fetch failed (storage error); try again on the next wake-up.
    pub fn handle_fetch_failed(&mut self) {
        if let Some(w) = self.window.as_deref_mut() {
            w.fetching = false;
        }
    }

    fn handle_deliver_ack(
        &mut self,
        req: u32,
        user: UserId,
        device: DeviceId,
        ack: DeliverAck,
    ) -> Vec<Step> {
        let mut seqs = Vec::with_capacity(ack.seqs.len());
        if let Some(w) = self.window.as_deref_mut() {
            for seq in ack.seqs {
                // In flight is ascending, and clients ack in order: usually the first one.
                let header = match w.in_flight.binary_search_by_key(&seq, |(s, _)| *s) {
                    Ok(at) => Some(w.in_flight.remove(at).1),
                    Err(_) => None,
                };
                seqs.push((seq, header));
            }
            if w.in_flight.is_empty() {
                w.in_flight = Vec::new();
            }
            // Freed window room needs no fetch of its own: a fetch cut short by the window left
            // `more` set, and anything stored since a short one wakes the connection.
        } else {
            seqs.extend(ack.seqs.into_iter().map(|s| (s, None)));
        }
        // Acks for seqs not in flight (e.g. delivered on an earlier connection) still count:
        // the inbox only touches this device's own entries, and reads their headers back.
        vec![Step::Ack {
            req,
            user,
            device,
            seqs,
        }]
    }

    /// The epoch changed; later redirects and forwards use it.
    pub fn set_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
    }

    fn welcome(&self, now_ms: u64) -> Welcome {
        Welcome {
            protocol_version: limits::PROTOCOL_VERSION,
            node_id: self.node_id,
            epoch: self.epoch,
            server_time_ms: now_ms,
            ping_interval_ms: self.keepalive.ping_interval_ms,
            idle_timeout_ms: self.keepalive.idle_timeout_ms,
            deliver_window: DELIVER_WINDOW,
            frame_bytes_max: limits::FRAME_BYTES_MAX as u32,
        }
    }

    fn not_client_frame(&mut self, req: u32, body: &Body) -> Vec<Step> {
        vec![Step::Write(error_frame(
            req,
            ErrorCode::UnknownFrameType,
            format!("{} is not a client-to-server frame", body.name()),
            0,
        ))]
    }

    fn fatal(&mut self, req: u32, code: ErrorCode, message: String) -> Vec<Step> {
        self.peer = Peer::Closed;
        self.window = None;
        vec![Step::Close(Frame::new(
            req,
            ringpost_wire::Error {
                code: code.as_u16(),
                message: ringpost_wire::limits::bounded_text(message),
                retry_after_ms: 0,
                fatal: true,
            },
        ))]
    }
}

/// A service's answer frame, stamped with the request id it answers.
fn reply(req: u32, mut frame: Frame) -> Frame {
    if frame.req == 0 {
        frame.req = req;
    }
    frame
}

/// Builds an `Error` frame.
pub fn error_frame(req: u32, code: ErrorCode, message: String, retry_after_ms: u32) -> Frame {
    Frame::new(
        req,
        ringpost_wire::Error {
            code: code.as_u16(),
            message: ringpost_wire::limits::bounded_text(message),
            retry_after_ms,
            fatal: code.is_fatal(),
        },
    )
}

/// Frames a client may send (everything else is server-to-client only).
fn is_client_frame(body: &Body) -> bool {
    matches!(
        body.kind().direction(),
        Direction::ToServer | Direction::Both
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use ringpost_wire::{Hello, Ping, RegisterRequest, Send};

    fn hello(auth: Option<Auth>) -> Frame {
        Frame::new(
            1,
            Hello {
                protocol_version: 1,
                auth,
                user_agent: "t".into(),
            },
        )
    }

    fn auth() -> Auth {
        Auth {
            user: 15550001,
            device: 1,
            token: Bytes::from_static(&[7; 32]),
        }
    }

    fn authed() -> Session {
        let mut s = Session::new(0, 9, 1, Keepalive::default());
        s.handle_frame(hello(Some(auth())), 0);
        s.handle_answer(
            1,
            Answer::Authenticated {
                user: 15550001,
                device: 1,
                frames: vec![],
            },
        );
        s
    }

    fn is_close_with(steps: &[Step], code: ErrorCode) -> bool {
        matches!(steps, [Step::Close(Frame { body: Body::Error(e), .. })] if e.code == code.as_u16())
    }

    fn is_error_with(steps: &[Step], code: ErrorCode) -> bool {
        matches!(steps, [Step::Write(Frame { body: Body::Error(e), .. })] if e.code == code.as_u16())
    }

    #[test]
    fn first_frame_must_be_hello() {
        let mut s = Session::new(0, 1, 1, Keepalive::default());
        let steps = s.handle_frame(Frame::new(3, ringpost_wire::DeliverAck { seqs: vec![] }), 0);
        assert!(is_close_with(&steps, ErrorCode::UnexpectedFrame));
        assert!(s.is_closed());
        assert!(
            s.handle_frame(hello(None), 1).is_empty(),
            "a closed session ignores input"
        );
    }

    #[test]
    fn wrong_protocol_version_is_refused() {
        let mut s = Session::new(0, 1, 1, Keepalive::default());
        let f = Frame::new(
            1,
            Hello {
                protocol_version: 99,
                auth: None,
                user_agent: String::new(),
            },
        );
        assert!(is_close_with(
            &s.handle_frame(f, 0),
            ErrorCode::UnsupportedVersion
        ));
    }

    #[test]
    fn anonymous_may_register_but_not_send() {
        let mut s = Session::new(0, 1, 1, Keepalive::default());
        let steps = s.handle_frame(hello(None), 0);
        assert!(matches!(
            &steps[..],
            [Step::Write(Frame {
                body: Body::Welcome(_),
                ..
            })]
        ));
        let reg = Frame::new(
            2,
            RegisterRequest {
                phone: 1555,
                channel: ringpost_wire::CodeChannel::Sms,
            },
        );
        assert!(matches!(
            &s.handle_frame(reg, 0)[..],
            [Step::Execute {
                req: 2,
                request: Request::Anonymous(_)
            }]
        ));
        let send = Frame::new(
            3,
            Send {
                msg_id: [1; 16],
                to: 2,
                ciphertexts: vec![],
            },
        );
        assert!(is_error_with(
            &s.handle_frame(send, 0),
            ErrorCode::Unauthenticated
        ));
        assert_eq!(
            s.peer(),
            Peer::Anonymous,
            "a refused request does not close the connection"
        );
    }

    #[test]
    fn authentication_gates_everything() {
        let mut s = Session::new(0, 1, 1, Keepalive::default());
        let steps = s.handle_frame(hello(Some(auth())), 0);
        assert!(matches!(
            &steps[..],
            [Step::Execute {
                request: Request::Authenticate(_),
                ..
            }]
        ));
        // Pipelined frames before the answer are a protocol violation.
        let mut s2 = Session::new(0, 1, 1, Keepalive::default());
        s2.handle_frame(hello(Some(auth())), 0);
        let send = Frame::new(
            3,
            Send {
                msg_id: [1; 16],
                to: 2,
                ciphertexts: vec![],
            },
        );
        assert!(is_close_with(
            &s2.handle_frame(send, 0),
            ErrorCode::UnexpectedFrame
        ));
        // A refused token closes.
        let steps = s.handle_answer(
            1,
            Answer::Error {
                code: ErrorCode::BadCredentials,
                message: "no".into(),
                retry_after_ms: 0,
            },
        );
        assert!(is_close_with(&steps, ErrorCode::BadCredentials));
    }

    #[test]
    fn authenticated_device_gets_welcome_and_requests_carry_identity() {
        let mut s = Session::new(0, 1, 1, Keepalive::default());
        s.handle_frame(hello(Some(auth())), 0);
        let steps = s.handle_answer(
            1,
            Answer::Authenticated {
                user: 15550001,
                device: 1,
                frames: vec![],
            },
        );
        assert!(matches!(
            &steps[..],
            [Step::Write(Frame {
                req: 1,
                body: Body::Welcome(_)
            })]
        ));
        let send = Frame::new(
            4,
            Send {
                msg_id: [1; 16],
                to: 2,
                ciphertexts: vec![],
            },
        );
        match &s.handle_frame(send, 5)[..] {
            [Step::Execute {
                req: 4,
                request:
                    Request::Device {
                        user: 15550001,
                        device: 1,
                        ..
                    },
            }] => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ping_is_answered_in_any_open_state() {
        let mut s = Session::new(0, 1, 1, Keepalive::default());
        let steps = s.handle_frame(Frame::new(8, Ping { nonce: 42 }), 0);
        assert_eq!(steps, vec![Step::Write(Frame::new(8, Pong { nonce: 42 }))]);
    }

    #[test]
    fn server_frames_from_a_client_are_rejected_without_closing() {
        let mut s = authed();
        let f = Frame::new(5, ringpost_wire::Pong { nonce: 1 });
        assert!(is_error_with(
            &s.handle_frame(f, 0),
            ErrorCode::UnknownFrameType
        ));
        assert!(!s.is_closed());
    }

    fn header(seq: u64) -> EntryHeader {
        EntryHeader {
            kind: crate::inbox::EntryKind::Message,
            from_user: 7,
            from_device: 1,
            msg_id: [seq as u8; 16],
            sole_copy: true,
        }
    }

    #[test]
    fn delivery_window_is_bounded_and_refilled_by_acks() {
        let mut s = authed();
        let (after, limit) = s.poll_fetch().expect("a new device drains its inbox");
        assert_eq!((after, limit), (0, DELIVER_WINDOW as usize));
        assert_eq!(s.poll_fetch(), None, "one fetch at a time");
        let fetched: Vec<(u64, EntryHeader)> = (1..=DELIVER_WINDOW as u64)
            .map(|s| (s, header(s)))
            .collect();
        s.handle_fetched(&fetched, limit);
        s.handle_wake();
        assert_eq!(s.poll_fetch(), None, "window full: nothing more until acks");
        let steps = s.handle_frame(
            Frame::new(
                0,
                DeliverAck {
                    seqs: vec![1, 2, 3],
                },
            ),
            1,
        );
        let [Step::Ack { seqs, .. }] = &steps[..] else {
            panic!("{steps:?}")
        };
        assert_eq!(
            seqs,
            &[
                (1, Some(header(1))),
                (2, Some(header(2))),
                (3, Some(header(3)))
            ],
            "acks carry what the connection delivered"
        );
        assert_eq!(s.poll_fetch(), Some((DELIVER_WINDOW as u64, 3)));
        // An ack of something this connection did not deliver has no header.
        let steps = s.handle_frame(Frame::new(0, DeliverAck { seqs: vec![1, 999] }), 2);
        assert!(
            matches!(&steps[..], [Step::Ack { seqs, .. }] if seqs == &[(1, None), (999, None)])
        );
        s.handle_fetched(&[], 3);
        assert_eq!(s.poll_fetch(), None, "a short read means drained");
        s.handle_wake();
        assert_eq!(s.poll_fetch(), Some((DELIVER_WINDOW as u64, 3)));
    }

    #[test]
    fn session_is_small() {
        // Lives as long as the connection: keep it a handful of words.
        assert!(
            std::mem::size_of::<Session>() <= 64,
            "{}",
            std::mem::size_of::<Session>()
        );
    }
}
