//! Attackers: a process (`ringpost-chaos attack`) on the `attacker` host that abuses the node for
//! the length of an `abuse` fault while the honest workload runs, then writes what it saw
//! ([`AttackSummary`]) for the report.
//!
//! | attack | what it does | bounded by |
//! |---|---|---|
//! | `preauth` | thousands of TCP and WebSocket connections from several source addresses that never say `Hello`; reopened when the node closes them | [`PREAUTH_CONNECTIONS_MAX`], [`PREAUTH_OPENS_PER_S_MAX`] |
//! | `slow-reader` | devices whose connections get large messages (from an attacker sender) and never read their socket | [`SLOW_READERS`], [`SLOW_SENDS_PER_S_MAX`] |
//! | `ack-flood` | devices sending `DeliverAck`s of 256 random seqs each, as fast as the node takes them | [`ACK_FRAMES_PER_S_MAX`] |
//! | `prekey-drain` | users claiming one user's prekeys in a loop, ignoring `retry_after_ms` | [`CLAIMS_PER_S_MAX`] |
//! | `register-flood` | anonymous `RegisterRequest`s for honest and random numbers, each followed by `RegisterVerify`s with wrong codes | [`REGISTER_STEPS_PER_S_MAX`] |
//! | `malformed` | random and mutated frames, text messages and broken framing over ws and QUIC, before and after `Hello` | [`MALFORMED_FRAMES_PER_S_MAX`] |
//! | `peer` | junk datagrams at a cluster node's peer port, and QUIC dials (ALPN `ringpost-peer/2`) that never prove themselves or prove wrongly | [`PEER_DATAGRAMS_PER_S_MAX`], [`PEER_DIALERS_PER_SOURCE`] |
//!
//! Every attack is paced: the point is to show the node's bounds hold while honest clients are
//! served, not to saturate the machine the run shares (the run's processes share its cores).
//! Besides counts, an attack may find [`AttackSummary::violations`]: things the node must never
//! do whatever the load (accept a wrong code, hand out more prekeys than the claim budget
//! allows, send a frame our decoder refuses); any of them fails the scenario.

mod flood;
mod malformed;
mod peer;
mod preauth;
mod slow_reader;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use rand::Rng;
use ringpost_client::{dev, Auth, Client, ClientConfig, ClientError, TlsOptions};
use serde::{Deserialize, Serialize};

pub use flood::{ACK_FRAMES_PER_S_MAX, CLAIMS_PER_S_MAX, REGISTER_STEPS_PER_S_MAX};
pub use malformed::MALFORMED_FRAMES_PER_S_MAX;
pub use peer::{PEER_DATAGRAMS_PER_S_MAX, PEER_DIALERS_PER_SOURCE};
pub use preauth::{PREAUTH_CONNECTIONS_MAX, PREAUTH_OPENS_PER_S_MAX};
pub use slow_reader::{SLOW_READERS, SLOW_SENDS_PER_S_MAX};

/// First phone number of the users an attacker registers (far from the population's).
pub const FIRST_ATTACKER_USER: u64 = 15_559_000;

/// How often the stop file is looked at.
const STOP_POLL: Duration = Duration::from_millis(100);

/// Time to register one attacker device.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);

/// The attacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Attack {
    Preauth,
    SlowReader,
    AckFlood,
    PrekeyDrain,
    RegisterFlood,
    Malformed,
    Peer,
}

impl Attack {
    /// The fault kind's name (`abuse-<attack>`), also the scenario's.
    pub fn name(self) -> &'static str {
        match self {
            Attack::Preauth => "abuse-preauth",
            Attack::SlowReader => "abuse-slow-reader",
            Attack::AckFlood => "abuse-ack-flood",
            Attack::PrekeyDrain => "abuse-prekey-drain",
            Attack::RegisterFlood => "abuse-register-flood",
            Attack::Malformed => "abuse-malformed",
            Attack::Peer => "abuse-peer",
        }
    }

    pub fn describe(self) -> String {
        match self {
            Attack::Preauth => format!(
                "up to {PREAUTH_CONNECTIONS_MAX} TCP and WebSocket connections that never say \
                 Hello, from several source addresses"
            ),
            Attack::SlowReader => {
                format!("{SLOW_READERS} devices that never read their socket, sent 60 KiB messages")
            }
            Attack::AckFlood => {
                format!("DeliverAcks of 256 random seqs, up to {ACK_FRAMES_PER_S_MAX} frames/s")
            }
            Attack::PrekeyDrain => format!(
                "three users claim one user's prekeys in a loop (up to {CLAIMS_PER_S_MAX}/s)"
            ),
            Attack::RegisterFlood => format!(
                "RegisterRequest and wrong-code RegisterVerify floods (up to \
                 {REGISTER_STEPS_PER_S_MAX} steps/s)"
            ),
            Attack::Malformed => format!(
                "random and mutated frames over ws and QUIC (up to \
                 {MALFORMED_FRAMES_PER_S_MAX} frames/s)"
            ),
            Attack::Peer => format!(
                "junk datagrams at the peer port (up to {PEER_DATAGRAMS_PER_S_MAX}/s) and \
                 {PEER_DIALERS_PER_SOURCE} unauthenticated QUIC dialers per source address"
            ),
        }
    }
}

/// Everything an attacker process needs (written by the orchestrator as JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttackSpec {
    pub attack: Attack,
    pub seed: u64,
    /// The node's client WebSocket URL (`ws://ip:port`).
    pub ws_url: String,
    /// The node's QUIC URL, when it listens on QUIC.
    pub quic_url: Option<String>,
    /// A node's peer address (cluster runs).
    pub peer_addr: Option<SocketAddr>,
    pub ca_file: Option<PathBuf>,
    pub codes_file: PathBuf,
    /// Source addresses this host may use (its own first).
    pub sources: Vec<Ipv4Addr>,
    /// Honest users' numbers (the register flood asks codes for them too).
    pub victims: Vec<u64>,
    /// The orchestrator creates this file when the attack should end.
    pub stop_file: PathBuf,
    /// Where the summary goes.
    pub summary: PathBuf,
}

impl AttackSpec {
    fn config(&self) -> ClientConfig {
        let mut config = ClientConfig::new(self.ws_url.clone());
        if let Some(ca) = &self.ca_file {
            config = config.with_ca_file(ca.clone());
        }
        config.request_timeout = Duration::from_secs(10);
        config.connect_timeout = Duration::from_secs(5);
        config
    }

    /// TLS options for raw connections (trusting the run's dev CA when there is one).
    fn tls(&self) -> TlsOptions {
        self.ca_file
            .as_ref()
            .map(TlsOptions::ca_file)
            .unwrap_or_default()
    }

    fn stopped(&self) -> bool {
        self.stop_file.exists()
    }
}

/// What an attacker saw.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AttackSummary {
    pub attack: Option<Attack>,
    /// Named counts (connections opened, refused, answers by error code, ...).
    pub counts: BTreeMap<String, u64>,
    /// What the node must never do and did.
    pub violations: Vec<String>,
    /// Other observations, for the report.
    pub notes: Vec<String>,
}

impl AttackSummary {
    /// One line for the fault's detail.
    pub fn describe(&self) -> String {
        let counts: Vec<String> = self
            .counts
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let mut text = counts.join(", ");
        for note in &self.notes {
            text.push_str("; ");
            text.push_str(note);
        }
        if !self.violations.is_empty() {
            text.push_str(&format!("; VIOLATIONS: {}", self.violations.join("; ")));
        }
        text
    }

    pub fn read(path: &Path) -> Result<AttackSummary> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Ok(serde_json::from_slice(&bytes)?)
    }
}

/// Counts shared by an attack's tasks.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tally(Arc<Mutex<AttackSummary>>);

impl Tally {
    pub(crate) fn add(&self, name: &str, n: u64) {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *s.counts.entry(name.to_string()).or_default() += n;
    }

    pub(crate) fn max(&self, name: &str, value: u64) {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let slot = s.counts.entry(name.to_string()).or_default();
        *slot = (*slot).max(value);
    }

    /// Counts an error answer by its code name (`error Malformed`).
    pub(crate) fn error(&self, e: &ClientError) {
        self.add(&error_name(e), 1);
    }

    pub(crate) fn violation(&self, what: String) {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded: the first few say enough.
        if s.violations.len() < 20 {
            s.violations.push(what);
        }
    }

    pub(crate) fn note(&self, what: String) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .notes
            .push(what);
    }

    fn take(&self) -> AttackSummary {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// The name an error is counted under: its server code, or what went wrong locally.
pub(crate) fn error_name(e: &ClientError) -> String {
    match e {
        ClientError::Server { code, .. } => match code.known() {
            Some(code) => format!("error {code:?}"),
            None => format!("error code {}", code.as_u16()),
        },
        ClientError::Timeout(_) => "timed out".into(),
        _ => "transport error".into(),
    }
}

/// Whether an error is the node's `RateLimited`.
pub(crate) fn is_rate_limited(e: &ClientError) -> bool {
    matches!(e, ClientError::Server { code, .. }
        if code.known() == Some(ringpost_client::ErrorCode::RateLimited))
}

/// Runs the attack until the stop file appears, then writes the summary.
pub async fn run(spec: AttackSpec) -> Result<()> {
    let tally = Tally::default();
    let spec = Arc::new(spec);
    let result = match spec.attack {
        Attack::Preauth => preauth::run(spec.clone(), tally.clone()).await,
        Attack::SlowReader => slow_reader::run(spec.clone(), tally.clone()).await,
        Attack::AckFlood => flood::ack_flood(spec.clone(), tally.clone()).await,
        Attack::PrekeyDrain => flood::prekey_drain(spec.clone(), tally.clone()).await,
        Attack::RegisterFlood => flood::register_flood(spec.clone(), tally.clone()).await,
        Attack::Malformed => malformed::run(spec.clone(), tally.clone()).await,
        Attack::Peer => peer::run(spec.clone(), tally.clone()).await,
    };
    if let Err(e) = &result {
        tally.note(format!("the attacker stopped early: {e:#}"));
    }
    let mut summary = tally.take();
    summary.attack = Some(spec.attack);
    let tmp = spec.summary.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&summary)?)?;
    std::fs::rename(&tmp, &spec.summary)?;
    result
}

/// Waits until the stop file appears.
pub(crate) async fn until_stopped(spec: &AttackSpec) {
    while !spec.stopped() {
        tokio::time::sleep(STOP_POLL).await;
    }
}

/// A pacer: at most `per_s` events a second (sleeps when ahead).
pub(crate) struct Pace {
    start: tokio::time::Instant,
    per_s: f64,
    done: u64,
}

impl Pace {
    pub(crate) fn new(per_s: u32) -> Pace {
        Pace {
            start: tokio::time::Instant::now(),
            per_s: f64::from(per_s.max(1)),
            done: 0,
        }
    }

    pub(crate) async fn tick(&mut self) {
        self.done += 1;
        let due = self.start + Duration::from_secs_f64(self.done as f64 / self.per_s);
        tokio::time::sleep_until(due).await;
    }
}

/// Registers an attacker device for `phone`; its credentials.
pub(crate) async fn register(spec: &AttackSpec, phone: u64) -> Result<Auth> {
    let (client, registered) = tokio::time::timeout(
        REGISTER_TIMEOUT,
        dev::register_device(spec.config(), phone, &spec.codes_file),
    )
    .await
    .context("registering an attacker device timed out")?
    .with_context(|| format!("registering attacker {phone}"))?;
    client.close().await;
    Ok(Auth {
        user: registered.user,
        device: registered.device,
        token: registered.token,
    })
}

/// An SDK client of an attacker device.
pub(crate) async fn client_of(spec: &AttackSpec, auth: Auth) -> Result<Client> {
    Ok(Client::connect(spec.config().with_auth(auth)).await?)
}

/// Random junk of 1..=`max` bytes.
pub(crate) fn junk(rng: &mut impl Rng, max: usize) -> Bytes {
    let len = rng.gen_range(1..=max.max(1));
    let mut bytes = vec![0u8; len];
    rng.fill(&mut bytes[..]);
    Bytes::from(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attacks_have_abuse_names_and_round_trip() {
        for attack in [
            Attack::Preauth,
            Attack::SlowReader,
            Attack::AckFlood,
            Attack::PrekeyDrain,
            Attack::RegisterFlood,
            Attack::Malformed,
            Attack::Peer,
        ] {
            assert!(attack.name().starts_with("abuse-"));
            assert!(!attack.describe().is_empty());
            let text = serde_json::to_string(&attack).unwrap();
            assert_eq!(serde_json::from_str::<Attack>(&text).unwrap(), attack);
        }
    }
}
