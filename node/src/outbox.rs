//! The receipt outbox task: sends the `delivered` receipts that acks left in their users'
//! outboxes (see `inbox/outbox.rs`) to the senders' owners, then acks each outbox row.
//!
//! A user's outbox lives in that user's shard, so only the node serving the user sends it; a
//! node that lost the shard leaves it to the new owner, whose import of the shard queues it.
//! A row is acked only after its receipt was stored (or refused for good: an unknown user), so
//! a crash sends it again: the sender may see a receipt twice, never lose one.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tracing::{debug, warn};

use crate::inbox::{AckRequest, OutboxReceipt, OUTBOX_DEVICE};
use crate::peer::{Store, StoreKind, Stored, Targets};
use crate::routing::Route;
use crate::server::Server;

/// Outbox rows read and sent per round for one user.
pub const OUTBOX_BATCH_ROWS: usize = 64;

/// Pause before trying again users whose receipts could not be stored (their sender's owner
/// is unreachable or moving).
pub const OUTBOX_RETRY_PAUSE: Duration = Duration::from_millis(500);

/// Users whose outboxes are sent at the same time.
pub const OUTBOX_USERS_IN_FLIGHT: usize = 16;

/// Runs until the node stops.
pub async fn run(server: Arc<Server>) {
    loop {
        let users = server.inbox.outbox().next().await;
        // Users at once, and each user's rows at once: a receipt's store waits for its
        // sender's owner (a group commit, replicas, a peer round trip), so one at a time
        // would cap the node's receipts at one store's latency.
        let outcomes: Vec<(u64, Result<(), String>)> = futures::stream::iter(users)
            .map(|user| {
                let server = server.clone();
                async move { (user, send_outbox(&server, user).await) }
            })
            .buffer_unordered(OUTBOX_USERS_IN_FLIGHT)
            .collect()
            .await;
        let mut retry = Vec::new();
        for (user, outcome) in outcomes {
            if let Err(why) = outcome {
                debug!(user, why, "receipt outbox: will retry");
                retry.push(user);
            }
        }
        if !retry.is_empty() {
            server.inbox.outbox().retry_later(retry);
            tokio::time::sleep(OUTBOX_RETRY_PAUSE).await;
        }
    }
}

/// Sends every row of one user's outbox. `Err` if some must be tried again later.
async fn send_outbox(server: &Arc<Server>, user: u64) -> Result<(), String> {
    match server.routing.route(user) {
        Route::Local { .. } if server.serves_here(user).is_none() => {}
        // The shard moved: its new owner sends the outbox after importing it.
        Route::Remote { .. } => {
            debug!(
                user,
                "receipt outbox: the user's shard moved; its new owner sends it"
            );
            return Ok(());
        }
        _ => return Err("this node does not serve the user right now".into()),
    }
    loop {
        let rows = server
            .inbox
            .read(
                user,
                OUTBOX_DEVICE,
                0,
                OUTBOX_BATCH_ROWS,
                server.expiry_now_ms(),
            )
            .map_err(|e| e.to_string())?;
        if rows.is_empty() {
            return Ok(());
        }
        let mut sent = Vec::with_capacity(rows.len());
        let mut failed = None;
        let mut stores = Vec::with_capacity(rows.len());
        for (seq, entry) in rows {
            let Some(receipt) = OutboxReceipt::from_entry(&entry) else {
                warn!(user, seq, "receipt outbox row does not decode; dropping it");
                sent.push((seq, Some(entry.header())));
                continue;
            };
            // Polled in row order by `join_all`: stores of one conversation keep that order.
            let stored = server.store(Store {
                to_user: receipt.to_user,
                from_user: receipt.from_user,
                from_device: receipt.from_device,
                msg_id: receipt.msg_id,
                kind: StoreKind::Delivered,
                targets: Targets::AllDevices(Vec::new()),
                except: None,
                receipt_msg_ids: receipt.msg_ids,
                dedup: false,
                require_contact: false,
                expires_at_ms: 0,
            });
            let to = receipt.to_user;
            stores.push(async move { (seq, to, entry.header(), stored.await) });
        }
        for (seq, to, header, stored) in futures::future::join_all(stores).await {
            debug!(user, seq, to, msg_id = %hex::encode(header.msg_id), outcome = ?stored, "receipt outbox: stored a row's receipt");
            match stored {
                // Left in the outbox for the next round.
                Stored::Refused { message, .. } => failed = Some(message),
                // Stored, or never storable (the sender is gone, its inbox is full).
                _ => sent.push((seq, Some(header))),
            }
        }
        if !sent.is_empty() {
            server
                .inbox
                .ack_with(AckRequest {
                    user,
                    device: OUTBOX_DEVICE,
                    seqs: sent,
                    senders: Vec::new(),
                    now_ms: server.now_ms(),
                })
                .await
                .map_err(|e| e.to_string())?;
        }
        if let Some(why) = failed {
            return Err(why);
        }
    }
}
