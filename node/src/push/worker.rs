//! The push queue's driver: writes the [`Schedule`]'s row changes, calls the providers for
//! pushes that are due, and feeds their answers back. Thin: every decision is the schedule's.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use ringpost_wire::UserId;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::providers::{Answer, Providers, Wake};
use super::schedule::{row_key, Completed, DeviceKey, Job, Outcome};
use super::{now_us, Push};
use crate::accounts::Accounts;
use crate::storage::{Cf, Engine, WriteBatch};

/// How long the worker waits before writing the queue again after a failed write.
pub const WRITE_RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// The longest the worker sleeps with nothing due (it is woken by new pushes anyway).
const IDLE_WAIT: Duration = Duration::from_secs(60);

/// Everything the worker needs; [`PushWorker::run`] drives it until the task is aborted.
pub struct PushWorker {
    pub push: Arc<Push>,
    pub engine: Arc<dyn Engine>,
    pub accounts: Arc<Accounts>,
    pub providers: Arc<Providers>,
    /// Whether this node still owns `user`'s shard: a push for a user that moved away is
    /// dropped (the new owner queues its own when the next message lands there).
    pub owns: Arc<dyn Fn(UserId) -> bool + Send + Sync>,
    /// Provider calls in flight at most.
    pub concurrency: usize,
}

impl PushWorker {
    pub async fn run(self) {
        let this = Arc::new(self);
        let permits = Arc::new(Semaphore::new(this.concurrency.max(1)));
        loop {
            let written = this.flush().await;
            let now = now_us();
            let jobs = this.push.lock().take_due(now, permits.available_permits());
            for job in jobs {
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    break; // not reached: no more jobs than free permits were taken
                };
                tokio::spawn(this.clone().call(job, permit));
            }
            let (depth, next_due) = {
                let s = this.push.lock();
                (s.len(), s.next_due_us())
            };
            this.push.metrics.depth.store(depth as i64, Relaxed);
            let wait = if !written {
                WRITE_RETRY_INTERVAL
            } else {
                match next_due {
                    Some(due) if permits.available_permits() > 0 => {
                        Duration::from_micros(due.saturating_sub(now_us())).min(IDLE_WAIT)
                    }
                    _ => IDLE_WAIT,
                }
            };
            tokio::select! {
                _ = this.push.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Writes the queue's pending row changes (unsynced: the WAL keeps them across a process
    /// restart; the next synced write of the node makes them durable on disk). A brand-new push
    /// for a device without a token is forgotten instead of written. False if the write failed
    /// (the changes are kept for the next try).
    async fn flush(&self) -> bool {
        let writes = self.push.lock().take_writes();
        if writes.is_empty() {
            return true;
        }
        let engine = self.engine.clone();
        let accounts = self.accounts.clone();
        let kept = writes.clone();
        let written = tokio::task::spawn_blocking(move || {
            let mut batch = WriteBatch::new();
            let mut tokenless = Vec::new();
            for &(device, pending) in &writes {
                match pending {
                    Some(p) if p.attempts == 0 && !has_token(&accounts, device) => {
                        tokenless.push(device);
                    }
                    Some(p) => batch.put(Cf::PushQueue, row_key(device), p.encode()),
                    None => batch.delete(Cf::PushQueue, row_key(device)),
                }
            }
            if !batch.is_empty() {
                engine.write(batch, false)?;
            }
            Ok::<_, crate::storage::StorageError>(tokenless)
        })
        .await;
        match written {
            Ok(Ok(tokenless)) => {
                let mut forgotten = 0;
                let mut s = self.push.lock();
                for device in tokenless {
                    forgotten += u64::from(s.discard_unwritten(device));
                }
                drop(s);
                self.push.metrics.dropped.fetch_add(forgotten, Relaxed);
                true
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "writing the push queue failed; retrying");
                self.push.lock().restore_writes(kept);
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "writing the push queue: task failed; retrying");
                self.push.lock().restore_writes(kept);
                false
            }
        }
    }

    /// One provider call and its consequences.
    async fn call(self: Arc<Self>, job: Job, permit: OwnedSemaphorePermit) {
        let outcome = self.attempt(&job).await;
        let metrics = &self.push.metrics;
        let completed = self
            .push
            .lock()
            .complete(&job, outcome, now_us(), rand::random::<f64>());
        match completed {
            Completed::Sent { latency_us } => {
                metrics.latency.observe(Duration::from_micros(latency_us));
            }
            Completed::Dropped { gave_up: true, .. } => {
                metrics.gave_up.fetch_add(1, Relaxed);
            }
            Completed::Dropped { gave_up: false, .. } if outcome == Outcome::Dropped => {
                metrics.dropped.fetch_add(1, Relaxed);
            }
            Completed::Dropped { .. } | Completed::Retrying { .. } | Completed::Stale => {}
        }
        drop(permit);
        self.push.wake.notify_one();
    }

    async fn attempt(&self, job: &Job) -> Outcome {
        let (user, device) = job.device;
        if !(self.owns)(user) {
            return Outcome::Dropped;
        }
        let token = match self.accounts.push_token(user, device) {
            Ok(Some(token)) => token,
            Ok(None) => return Outcome::Dropped,
            Err(e) => {
                tracing::warn!(error = %e, "reading a push token failed");
                return Outcome::Retry {
                    not_before_us: None,
                };
            }
        };
        if !self.providers.has(token.provider) {
            tracing::debug!(provider = ?token.provider, "push provider not configured on this node");
            return Outcome::Dropped;
        }
        let wake = Wake {
            user,
            device,
            token: &token.token,
        };
        let metrics = &self.push.metrics;
        let answer = self
            .providers
            .send(token.provider, wake, now_us() / 1_000_000)
            .await;
        match answer {
            Answer::Sent => {
                metrics.sent.fetch_add(1, Relaxed);
                Outcome::Sent
            }
            Answer::Retry {
                retry_after_ms,
                why,
            } => {
                metrics.failed.fetch_add(1, Relaxed);
                tracing::debug!(attempts = job.pending.attempts + 1, %why, "push failed");
                Outcome::Retry {
                    not_before_us: retry_after_ms
                        .map(|ms| now_us().saturating_add(ms.saturating_mul(1000))),
                }
            }
            Answer::TokenInvalid(why) => {
                metrics.failed.fetch_add(1, Relaxed);
                let accounts = self.accounts.clone();
                let removed = tokio::task::spawn_blocking(move || {
                    accounts.remove_push_token_if(user, device, &token)
                })
                .await;
                match removed {
                    Ok(Ok(true)) => {
                        metrics.tokens_removed.fetch_add(1, Relaxed);
                        tracing::info!(%why, "push token invalid; removed");
                    }
                    Ok(Ok(false)) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "removing an invalid push token failed")
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "removing an invalid push token: task failed")
                    }
                }
                Outcome::TokenInvalid
            }
            Answer::Refused(why) => {
                metrics.failed.fetch_add(1, Relaxed);
                tracing::warn!(%why, "push refused by its provider; dropped");
                Outcome::Dropped
            }
        }
    }
}

fn has_token(accounts: &Accounts, (user, device): DeviceKey) -> bool {
    // A read error keeps the push: the call looks again.
    !matches!(accounts.push_token(user, device), Ok(None))
}
