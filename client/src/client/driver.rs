//! The one task per [`crate::Client`]: it reads the current connection, routes answers to their
//! requests and everything else to the event queue, pings, notices a dead connection, and
//! reconnects with backoff. Writes do not go through it (callers write under the link's lock),
//! so a slow write never stops it from reading.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ringpost_wire::limits::MIGRATE_RECONNECT_AFTER_MS_MAX;
use ringpost_wire::{Body, DecodeError, Frame, Ping};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::event::Event;
use super::link::{establish, establish_at, Established, Link};
use super::{LinkState, Queued, Shared};
use crate::backoff::Backoff;
use crate::connection::{Inbound, PeerClose, Reader};
use crate::endpoint::Endpoint;
use crate::error::ClientError;

/// A connection that hears nothing (not even a `Pong`) for this many ping intervals is dead:
/// half-open TCP, a partition, a frozen node. With the node's 30 s interval, 90 s, the node's own
/// idle timeout.
pub const DEAD_AFTER_PING_INTERVALS: u32 = 3;

/// Shortest ping interval accepted (a `Welcome` or a config asking for less gets this).
pub const PING_INTERVAL_MIN: Duration = Duration::from_millis(50);

/// A connection that lived this long is considered stable: the next reconnect starts the
/// backoff from the base again. Shorter-lived ones keep climbing, so a node that accepts and
/// immediately drops clients is not hammered.
pub const RECONNECT_STABLE_AFTER: Duration = Duration::from_secs(10);

/// How long closing our side of a dropped connection may take.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a link ended.
enum LinkEnd {
    /// The application closed the client (or dropped its last handle).
    Shutdown,
    /// The connection is gone; `error` is what the node said, if it said anything fatal.
    Dropped {
        reason: String,
        error: Option<ClientError>,
        /// Wait at least this long before reconnecting (`GoingAway`, `Migrate`).
        reconnect_after: Duration,
        /// Reconnect straight to this node first (`Migrate`).
        migrate_to: Option<Endpoint>,
    },
}

impl LinkEnd {
    fn dropped(reason: impl Into<String>) -> LinkEnd {
        LinkEnd::Dropped {
            reason: reason.into(),
            error: None,
            reconnect_after: Duration::ZERO,
            migrate_to: None,
        }
    }
}

pub(crate) struct Driver {
    pub(crate) shared: Arc<Shared>,
    pub(crate) events: mpsc::Sender<Queued>,
    pub(crate) shutdown: watch::Receiver<bool>,
}

impl Driver {
    /// Runs until the client is closed or gives up reconnecting.
    pub(crate) async fn run(mut self, reader: Reader, early: Vec<Frame>, link: Arc<Link>) {
        let (mut reader, mut early, mut link) = (reader, early, link);
        // Reconnect attempts since the last stable connection.
        let mut attempt: u32 = 0;
        loop {
            let end = self
                .run_link(&mut reader, &link, std::mem::take(&mut early))
                .await;
            let lived = link.opened.elapsed();
            let will_reconnect = match &end {
                LinkEnd::Shutdown => false,
                LinkEnd::Dropped { error, .. } => {
                    self.shared.config.reconnect && !error.as_ref().is_some_and(|e| e.is_terminal())
                }
            };
            if will_reconnect {
                self.shared.state.send_replace(LinkState::Reconnecting);
            }
            link.fail_pending();
            drop(reader);
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, link.close()).await;
            if !will_reconnect {
                self.shared.state.send_replace(LinkState::Closed);
            }

            let (reason, reconnect_after, migrate_to) = match end {
                LinkEnd::Shutdown => return,
                LinkEnd::Dropped {
                    reason,
                    reconnect_after,
                    migrate_to,
                    ..
                } => (reason, reconnect_after, migrate_to),
            };
            tracing::debug!(endpoint = %link.endpoint, %reason, will_reconnect, "connection dropped");
            self.emit(Queued::Event(Box::new(Event::Disconnected {
                reason,
                will_reconnect,
            })))
            .await;
            if !will_reconnect {
                return;
            }
            if lived >= RECONNECT_STABLE_AFTER {
                attempt = 0;
            }
            let reconnected = self
                .reconnect(&link, &mut attempt, reconnect_after, migrate_to)
                .await;
            match reconnected {
                Some(established) => {
                    self.shared
                        .redirects_followed
                        .fetch_add(u64::from(established.redirects), Ordering::AcqRel);
                    let new_link = Arc::new(Link::new(
                        established.writer,
                        established.endpoint,
                        established.welcome.clone(),
                    ));
                    *self
                        .shared
                        .welcome
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) = established.welcome.clone();
                    let reconnects = self.shared.reconnects.fetch_add(1, Ordering::AcqRel) + 1;
                    self.shared
                        .state
                        .send_replace(LinkState::Up(new_link.clone()));
                    reader = established.reader;
                    early = established.early;
                    link = new_link;
                    self.emit(Queued::Event(Box::new(Event::Reconnected {
                        welcome: established.welcome,
                        reconnects,
                    })))
                    .await;
                }
                None => {
                    // Closed by the application while reconnecting, or given up.
                    self.shared.state.send_replace(LinkState::Closed);
                    return;
                }
            }
        }
    }

    /// Tries to connect again until it works, the error is terminal, the attempts run out or the
    /// client is closed. `None` in all but the first case (the state is then `Closed` and the
    /// last event was emitted).
    ///
    /// With `migrate_to` (a `Migrate`), the first attempt goes straight there after `floor`,
    /// following no redirect; if it fails or is redirected, the usual attempts follow.
    async fn reconnect(
        &mut self,
        last: &Link,
        attempt: &mut u32,
        mut floor: Duration,
        migrate_to: Option<Endpoint>,
    ) -> Option<Established> {
        let config = &self.shared.config;
        if let Some(target) = migrate_to {
            tokio::select! {
                _ = tokio::time::sleep(floor) => {}
                _ = self.shutdown.wait_for(|closed| *closed) => return None,
            }
            let auth = self.shared.auth();
            let result = tokio::select! {
                r = Box::pin(establish_at(config, target.clone(), auth.as_ref(), 0)) => r,
                _ = self.shutdown.wait_for(|closed| *closed) => return None,
            };
            match result {
                Ok(established) => {
                    self.shared.migrations.fetch_add(1, Ordering::AcqRel);
                    return Some(established);
                }
                // Whatever it was (refused, timed out, redirected because the ring moved
                // again, or a terminal error the usual path will report), the usual path takes
                // over.
                Err(e) => {
                    tracing::debug!(error = %e, %target, "migrating failed; reconnecting as usual");
                    floor = e.retry_after().unwrap_or(Duration::ZERO);
                }
            }
        }
        let backoff = Backoff::new(config.backoff_base, config.backoff_cap);
        let last_url = last.endpoint.to_string();
        let mut tries: u32 = 0;
        let give_up = loop {
            if tries >= config.reconnect_attempts_max {
                break format!("gave up after {tries} reconnect attempts");
            }
            let delay = floor + backoff.delay(*attempt, &mut rand::thread_rng());
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.shutdown.wait_for(|closed| *closed) => return None,
            }
            // Alternate between the node that served us last and the configured entry point
            // (the last node may be gone for good; the entry point redirects to the new owner).
            let url = if tries.is_multiple_of(2) {
                &last_url
            } else {
                &config.url
            };
            tries += 1;
            *attempt = attempt.saturating_add(1);
            let auth = self.shared.auth();
            let result = tokio::select! {
                // Boxed: the handshake's state exists only while reconnecting, not in every
                // idle client's task.
                r = Box::pin(establish(config, url, auth.as_ref())) => r,
                _ = self.shutdown.wait_for(|closed| *closed) => return None,
            };
            match result {
                Ok(established) => return Some(established),
                Err(e) if e.is_terminal() => break format!("reconnect refused: {e}"),
                Err(e) => {
                    tracing::debug!(error = %e, %url, tries, "reconnect failed");
                    floor = e.retry_after().unwrap_or(Duration::ZERO);
                }
            }
        };
        self.shared.state.send_replace(LinkState::Closed);
        self.emit(Queued::Event(Box::new(Event::Disconnected {
            reason: give_up,
            will_reconnect: false,
        })))
        .await;
        None
    }

    /// Serves one link until it ends.
    async fn run_link(
        &mut self,
        reader: &mut Reader,
        link: &Arc<Link>,
        early: Vec<Frame>,
    ) -> LinkEnd {
        let ping_every = self
            .shared
            .config
            .ping_interval
            .unwrap_or(Duration::from_millis(u64::from(
                link.welcome.ping_interval_ms,
            )))
            .max(PING_INTERVAL_MIN);
        let dead_after = ping_every * DEAD_AFTER_PING_INTERVALS;
        let mut ticker = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_rx = Instant::now();
        let mut last = LastWords::default();

        for frame in early {
            if let Some(end) = self.handle_frame(frame, link, &mut last).await {
                return end;
            }
        }
        loop {
            let inbound = {
                let read = reader.next();
                tokio::pin!(read);
                loop {
                    tokio::select! {
                        r = &mut read => break r,
                        _ = ticker.tick() => {
                            if last_rx.elapsed() >= dead_after {
                                return LinkEnd::dropped(format!(
                                    "nothing heard from the node for {dead_after:?}"
                                ));
                            }
                            // Written by a short task of its own: this task keeps reading
                            // while the write waits for the lock or the socket.
                            let link = link.clone();
                            let nonce: u64 = rand::random();
                            tokio::spawn(async move {
                                let _ = link.write(&Frame::new(0, Ping { nonce })).await;
                            });
                        }
                        _ = link.killed() => return LinkEnd::dropped("a write to the node failed"),
                        _ = self.shutdown.wait_for(|closed| *closed) => return LinkEnd::Shutdown,
                    }
                }
            };
            match inbound {
                Ok(Inbound::Frame(bytes)) => {
                    last_rx = Instant::now();
                    match Frame::decode_bytes(&bytes) {
                        Ok(frame) => {
                            if let Some(end) = self.handle_frame(frame, link, &mut last).await {
                                return end;
                            }
                        }
                        Err(e @ DecodeError::UnknownFrameType { .. }) => {
                            // A newer node may send frame types this build does not know.
                            tracing::debug!(error = %e, "ignoring a frame of unknown type");
                        }
                        Err(e) => {
                            return LinkEnd::Dropped {
                                reason: format!("the node sent an undecodable frame: {e}"),
                                error: None,
                                reconnect_after: Duration::ZERO,
                                migrate_to: None,
                            }
                        }
                    }
                }
                Ok(Inbound::Ping(payload)) => {
                    last_rx = Instant::now();
                    let link = link.clone();
                    tokio::spawn(async move { link.pong(payload).await });
                }
                Ok(Inbound::Closed(close)) => {
                    let error = last.take();
                    return LinkEnd::Dropped {
                        reason: closed_reason(close.as_ref(), error.as_ref()),
                        error,
                        reconnect_after: Duration::ZERO,
                        migrate_to: None,
                    };
                }
                Err(e) => {
                    let error = last.take();
                    return LinkEnd::Dropped {
                        reason: match &error {
                            Some(said) => format!("{said}; then {e}"),
                            None => e.to_string(),
                        },
                        error,
                        reconnect_after: Duration::ZERO,
                        migrate_to: None,
                    };
                }
            }
        }
    }

    /// Routes one frame. `Some` ends the link.
    async fn handle_frame(
        &mut self,
        frame: Frame,
        link: &Link,
        last: &mut LastWords,
    ) -> Option<LinkEnd> {
        last.recent = None;
        if let Body::Error(error) = &frame.body {
            if error.fatal {
                last.fatal = Some(ClientError::from_server(error.clone()));
            } else if frame.req == 0 {
                last.recent = Some(ClientError::from_server(error.clone()));
            }
        }
        if frame.req != 0 {
            let kind = frame.body.name();
            let req = frame.req;
            if !link.complete(frame) {
                tracing::debug!(req, kind, "answer to a request nobody waits for");
            }
            return None;
        }
        match frame.body {
            Body::Deliver(deliver) => {
                self.emit(Queued::Deliver(Box::new(deliver))).await;
            }
            Body::Typing(typing) => self.emit_lossy(Event::Typing(typing)),
            Body::PresenceUpdate(update) => self.emit_lossy(Event::Presence(update)),
            // Sent once per crossing of the low watermark: not dropped.
            Body::PrekeyCount(c) => {
                self.emit(Queued::Event(Box::new(Event::PrekeysLow {
                    count: c.count,
                })))
                .await
            }
            Body::GoingAway(going) => {
                let after = Duration::from_millis(u64::from(going.reconnect_after_ms));
                let reason = format!("node going away: {}", going.reason);
                self.emit(Queued::Event(Box::new(Event::GoingAway(going))))
                    .await;
                return Some(LinkEnd::Dropped {
                    reason,
                    error: None,
                    reconnect_after: after,
                    migrate_to: None,
                });
            }
            Body::Migrate(migrate) => {
                let reconnect_after = migrate_delay(migrate.reconnect_after_ms);
                let target = link.endpoint.migrate_target(&migrate);
                let reason = match &target {
                    Ok(to) => format!("user moved to {to} at epoch {}", migrate.epoch),
                    Err(e) => format!("user moved to another node: {e}"),
                };
                self.emit(Queued::Event(Box::new(Event::Migrate(migrate))))
                    .await;
                return Some(LinkEnd::Dropped {
                    reason,
                    error: None,
                    reconnect_after,
                    migrate_to: target.ok(),
                });
            }
            Body::Error(error) if !error.fatal => {
                // An error about a frame sent without a request id (an ack, a typing
                // indicator): nobody to hand it to.
                tracing::warn!(code = error.code, message = %error.message, "node reported an error");
            }
            Body::Error(_) | Body::Pong(_) => {}
            other => tracing::debug!(kind = other.name(), "ignoring an unprompted frame"),
        }
        None
    }

    /// Queues an item, waiting for room (deliveries are bounded by the node's window).
    async fn emit(&mut self, item: Queued) {
        tokio::select! {
            _ = self.events.send(item) => {}
            _ = self.shutdown.wait_for(|closed| *closed) => {}
        }
    }

    /// Queues an ephemeral event, dropping it if the application is not keeping up: typing and
    /// presence are never stored, and a stale one is worth less than a stalled connection.
    fn emit_lossy(&mut self, event: Event) {
        if self
            .events
            .try_send(Queued::Event(Box::new(event)))
            .is_err()
        {
            tracing::debug!("event queue full: dropping an ephemeral event");
        }
    }
}

/// How long to wait before following a `Migrate`: what it asks, never more than
/// [`MIGRATE_RECONNECT_AFTER_MS_MAX`] (the decoder refuses a frame asking for more; this holds
/// whatever the frame said).
pub(crate) fn migrate_delay(reconnect_after_ms: u32) -> Duration {
    Duration::from_millis(u64::from(
        reconnect_after_ms.min(MIGRATE_RECONNECT_AFTER_MS_MAX),
    ))
}

/// What the node said last before a connection ended: why it ended, and whether reconnecting
/// can help ([`ClientError::is_terminal`]).
#[derive(Default)]
struct LastWords {
    /// An error marked fatal (the node closes after it). Kept to the end.
    fatal: Option<ClientError>,
    /// An unprompted error not marked fatal, if it was the very last frame: the node also
    /// closes after some of those (a connection replaced by a newer one of the same device gets
    /// `Forbidden`), and then it is the reason. Cleared by any later frame.
    recent: Option<ClientError>,
}

impl LastWords {
    fn take(&mut self) -> Option<ClientError> {
        self.fatal.take().or_else(|| self.recent.take())
    }
}

fn closed_reason(close: Option<&PeerClose>, fatal: Option<&ClientError>) -> String {
    match (fatal, close) {
        (Some(error), _) => error.to_string(),
        (None, Some(PeerClose { code, reason })) => {
            format!("node closed the connection (code {code:?}: {reason})")
        }
        (None, None) => "node closed the connection".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_migrate_delay_is_what_the_node_asks_up_to_the_bound() {
        assert_eq!(migrate_delay(0), Duration::ZERO);
        assert_eq!(migrate_delay(1_500), Duration::from_millis(1_500));
        let max = Duration::from_millis(u64::from(MIGRATE_RECONNECT_AFTER_MS_MAX));
        assert_eq!(migrate_delay(MIGRATE_RECONNECT_AFTER_MS_MAX), max);
        assert_eq!(migrate_delay(MIGRATE_RECONNECT_AFTER_MS_MAX + 1), max);
        assert_eq!(migrate_delay(u32::MAX), max);
    }
}
