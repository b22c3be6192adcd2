//! A device on the client SDK ([`ringpost_client::Client`]) instead of the lean client, for
//! `--client sdk`: the same scenarios, paying the SDK's per-connection driver task, request
//! correlation, event queue, dedup set and batched acks. Used to measure what the SDK costs
//! and to check it holds up under load; the standard runs use the lean client.
//!
//! Each send is a task awaiting `Client::send` (the SDK's API is one future per request), and
//! one task per device forwards `Client::next_event` into a bounded channel, so the scenario's
//! `select!` stays cancel-safe. The SDK acknowledges deliveries itself (`auto_ack`) and pings
//! itself; reconnecting is off, so a drop counts as an error as it does for the lean client.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, Result};
use bytes::Bytes;
use ringpost_client::{Client, ClientConfig, Event};
use ringpost_wire::{Auth, DeviceCiphertext, SendStatus};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::Incoming;

/// Events buffered between a device's SDK client and its scenario loop.
pub const SDK_EVENTS_BUFFERED_MAX: usize = 256;

/// Where SDK devices connect.
pub struct SdkConnector {
    urls: Vec<String>,
    ca_file: Option<PathBuf>,
    next: AtomicUsize,
}

impl SdkConnector {
    pub fn new(urls: Vec<String>, ca_file: Option<PathBuf>) -> SdkConnector {
        SdkConnector {
            urls,
            ca_file,
            next: AtomicUsize::new(0),
        }
    }

    pub async fn connect(&self, auth: &Auth) -> Result<SdkLink> {
        let url = self.urls[self.next.fetch_add(1, Ordering::Relaxed) % self.urls.len()].clone();
        let mut config = ClientConfig::new(url).with_auth(auth.clone());
        if let Some(ca) = &self.ca_file {
            config = config.with_ca_file(ca);
        }
        config.reconnect = false;
        let client = Arc::new(
            Client::connect(config)
                .await
                .map_err(|e| anyhow!("SDK connect: {e}"))?,
        );
        let (tx, rx) = mpsc::channel(SDK_EVENTS_BUFFERED_MAX);
        let c = client.clone();
        let forward = tokio::spawn(async move {
            while let Some(event) = c.next_event().await {
                if tx.send(event).await.is_err() {
                    break;
                }
            }
        });
        Ok(SdkLink {
            client,
            events: rx,
            sends: JoinSet::new(),
            forward,
        })
    }
}

/// One SDK device.
pub struct SdkLink {
    client: Arc<Client>,
    events: mpsc::Receiver<Event>,
    sends: JoinSet<Incoming>,
    forward: tokio::task::JoinHandle<()>,
}

fn translate(e: Event) -> Option<Incoming> {
    match e {
        Event::Message(d) => Some(Incoming::Message {
            body: d.body,
            ack: None,
        }),
        Event::Delivered { seq, .. } | Event::Read { seq, .. } => {
            Some(Incoming::Receipt { ack: seq })
        }
        Event::Disconnected { .. } => None,
        _ => Some(Incoming::Other),
    }
}

impl SdkLink {
    /// The next event; `Ok(None)` once the connection dropped. Cancel-safe.
    pub async fn next(&mut self) -> Result<Option<Incoming>> {
        tokio::select! {
            e = self.events.recv() => Ok(e.and_then(translate)),
            Some(r) = self.sends.join_next(), if !self.sends.is_empty() => {
                Ok(Some(r.unwrap_or(Incoming::Other)))
            }
        }
    }

    /// The next event already there, without waiting.
    pub fn buffered(&mut self) -> Result<Option<Incoming>> {
        if let Some(r) = self.sends.try_join_next() {
            return Ok(Some(r.unwrap_or(Incoming::Other)));
        }
        match self.events.try_recv() {
            Ok(e) => Ok(Some(translate(e).unwrap_or(Incoming::Other))),
            Err(_) => Ok(None),
        }
    }

    /// Starts a send; its `SendAck` (or failure) comes out of [`SdkLink::next`].
    pub fn push_send(
        &mut self,
        req: u32,
        to: (u64, u32),
        msg_id: [u8; 16],
        body: Bytes,
        sent_ns: u64,
    ) {
        let client = self.client.clone();
        self.sends.spawn(async move {
            let ct = vec![DeviceCiphertext {
                user: to.0,
                device: to.1,
                body,
            }];
            match client.send(to.0, msg_id, ct).await {
                Ok(ack) => Incoming::SendAck {
                    ok: ack.status == SendStatus::Ok,
                    sent_ns,
                    status: format!("{:?}", ack.status),
                },
                Err(e) => Incoming::Error {
                    code: e.code().map_or(0, |c| c.as_u16()),
                    req,
                    message: e.to_string(),
                },
            }
        });
    }

    /// The node this device's connection ended on (its `Welcome`).
    pub fn node_id(&self) -> u64 {
        self.client.welcome().node_id
    }

    pub async fn close(self) {
        self.forward.abort();
        self.client.close().await;
    }
}
