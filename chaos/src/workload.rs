//! The workload: SDK devices sending 1:1 messages and read receipts on a seeded schedule, and
//! recording every send, `SendAck`, delivery, ack, receipt and connection change into the
//! history.
//!
//! It runs as `ringpost-chaos workload` on a client host, in two steps:
//! - `--register`: registers every user of the population through the dev node's codes file
//!   (and links their extra devices), writing the credentials to a file;
//! - the run: connects the devices of its own host, sends from each on its own schedule (drawn
//!   from the seed before anything is sent, so the messages, their ids and their recipients are
//!   the same whatever the faults do), receives and acks until told to stop.
//!
//! With groups (`--groups`), every device also sends group messages on a schedule of its own,
//! and each group's creator changes its membership at seeded times ([`change_schedule`]);
//! devices record the group messages and changes they receive.
//!
//! Every ciphertext names the device it is for and its message ([`body_for`]), so a device given
//! another device's ciphertext shows it in the history. Sends from one device are sequential, so
//! its ack order is its send order; a send that gets no answer is retried with the same msg_id
//! (the node's idempotency key) until it gets one or the retry window closes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use rand::Rng;
use ringpost_client::{
    dev, Auth, Client, ClientConfig, ClientError, DeviceCiphertext, ErrorCode, Event as SdkEvent,
    ReceiptKind, SendStatus,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::history::{BodyTag, Clock, Dev, Event, GroupBodyTag, HistoryWriter, MsgId};

/// Messages one device sends in a run, at most.
pub const MESSAGES_PER_DEVICE_MAX: usize = 20_000;

/// Attempts for one message before it is abandoned (each bounded by the request timeout).
pub const SEND_ATTEMPTS_MAX: u32 = 1_000;

/// Time one request (a send, a receipt) may take before it is retried.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(8);

/// Pause between attempts of one message (doubling up to [`RETRY_PAUSE_MAX`]).
pub const RETRY_PAUSE: Duration = Duration::from_millis(100);
pub const RETRY_PAUSE_MAX: Duration = Duration::from_secs(2);

/// After the sending window, a message already started is retried this much longer; none is
/// started after the window.
pub const RETRY_GRACE: Duration = Duration::from_secs(45);

/// Padding added to each ciphertext, at most (bytes): bodies of varying size.
pub const PADDING_BYTES_MAX: usize = 512;

/// Read receipts queued per device for sending; more are not sent (the history says so only by
/// their absence, and a receipt not sent is not checked).
pub const RECEIPT_QUEUE_MAX: usize = 1024;

/// Groups one run may create, at most (`--groups`).
pub const GROUPS_MAX: u32 = 16;

/// Members of a workload group (the creator included), drawn from the seed between these
/// (fewer when the population is smaller).
pub const GROUP_MEMBERS_MIN: usize = 4;
pub const GROUP_MEMBERS_MAX: usize = 6;

/// Group messages a device sends per second, as a share of its 1:1 rate (on a schedule of its
/// own, so the 1:1 schedule is the same with and without groups).
pub const GROUP_RATE_FRACTION: f64 = 0.25;

/// Membership changes per group and run, at most (`--group-changes`). The creator's device
/// makes them, and a device may make 10 account changes a minute (docs/protocol.md): a larger
/// number only waits for the rate limit.
pub const GROUP_CHANGES_MAX: u32 = 16;

/// How often the stop file is looked at.
const STOP_POLL: Duration = Duration::from_millis(100);

/// Time to connect one device (registration and the first connect of a run).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Attempts at registering one device before the run is given up.
const REGISTER_ATTEMPTS_MAX: u32 = 5;

/// Ping interval the devices use: a dead connection is noticed after three, 3 s.
pub const PING_INTERVAL: Duration = Duration::from_secs(1);

/// Longest reconnect backoff: after a partition heals, devices are back within this.
pub const BACKOFF_CAP: Duration = Duration::from_secs(2);

/// A user of the population: its phone number, how many devices, which client host runs them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserPlan {
    pub user: u64,
    pub devices: u32,
    pub host: String,
}

/// A registered device.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Credential {
    pub user: u64,
    pub device: u32,
    pub token: String,
    pub host: String,
    /// The node it registered on (in a cluster: its user's owner then).
    #[serde(default)]
    pub node: Option<u64>,
}

/// Everything a workload process needs (written by the orchestrator as JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkloadSpec {
    /// This process's host (`client1`); its devices are the population's with this host.
    pub host: String,
    /// Where the devices connect (`ws://…` or `quic://…`, the node or a relay in front of it).
    pub url: String,
    pub ca_file: Option<PathBuf>,
    pub codes_file: PathBuf,
    pub seed: u64,
    pub population: Vec<UserPlan>,
    pub credentials: PathBuf,
    pub history: PathBuf,
    /// When sending starts (Unix microseconds) and for how long.
    pub start_at_us: u64,
    pub send_ms: u64,
    /// Messages per second per device (a Poisson schedule).
    pub rate_per_device: f64,
    /// Fraction of received messages answered with a read receipt.
    pub receipt_fraction: f64,
    /// The orchestrator creates this file when the run is over.
    pub stop_file: PathBuf,
    /// Hard end (Unix microseconds), whatever the stop file says.
    pub deadline_us: u64,
    /// Groups to create at registration and send to during the run (0: none, the 1:1 workload
    /// alone; at most [`GROUPS_MAX`]).
    #[serde(default)]
    pub groups: u32,
    /// Membership changes each group's creator makes during the sending window (at most
    /// [`GROUP_CHANGES_MAX`]; 0: fixed membership).
    #[serde(default)]
    pub group_changes: u32,
}

impl WorkloadSpec {
    /// Where `--register` writes the groups it created (beside the credentials).
    pub fn groups_file(&self) -> PathBuf {
        self.credentials.with_file_name("groups.json")
    }

    fn config(&self) -> ClientConfig {
        let mut config = ClientConfig::new(self.url.clone());
        if let Some(ca) = &self.ca_file {
            config = config.with_ca_file(ca.clone());
        }
        config.auto_ack = false;
        config.request_timeout = REQUEST_TIMEOUT;
        config.ping_interval = Some(PING_INTERVAL);
        config.backoff_cap = BACKOFF_CAP;
        config.reconnect_attempts_max = 100_000;
        config.connect_timeout = Duration::from_secs(5);
        config
    }
}

/// The ciphertext the workload writes for `to`: it names its recipient device and message.
pub fn body_for(to: Dev, msg_id: MsgId, from: Dev, padding: usize) -> Bytes {
    let mut text = format!(
        "rp1 {}.{} {} {}.{} ",
        to.user, to.device, msg_id, from.user, from.device
    );
    text.extend(std::iter::repeat_n('x', padding.min(PADDING_BYTES_MAX)));
    Bytes::from(text)
}

/// Reads what a ciphertext says about itself; `None` if the workload did not write it.
pub fn parse_body(body: &[u8]) -> Option<BodyTag> {
    let text = std::str::from_utf8(body).ok()?;
    let mut parts = text.split_whitespace();
    if parts.next()? != "rp1" {
        return None;
    }
    let to = parse_dev(parts.next()?)?;
    let msg_id = parts.next()?.parse().ok()?;
    Some(BodyTag { to, msg_id })
}

/// The one ciphertext the workload writes for a group message: it names the group and message.
pub fn group_body(group: MsgId, msg_id: MsgId, from: Dev, padding: usize) -> Bytes {
    let mut text = format!("rpg1 {group} {msg_id} {}.{} ", from.user, from.device);
    text.extend(std::iter::repeat_n('x', padding.min(PADDING_BYTES_MAX)));
    Bytes::from(text)
}

/// Reads what a group ciphertext says about itself; `None` if the workload did not write it.
pub fn parse_group_body(body: &[u8]) -> Option<GroupBodyTag> {
    let text = std::str::from_utf8(body).ok()?;
    let mut parts = text.split_whitespace();
    if parts.next()? != "rpg1" {
        return None;
    }
    let group = parts.next()?.parse().ok()?;
    let msg_id = parts.next()?.parse().ok()?;
    Some(GroupBodyTag { group, msg_id })
}

/// A group the workload created: its id and members (the creator first).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupRecord {
    pub group: MsgId,
    pub members: Vec<u64>,
    pub creator: Dev,
}

/// The members of each of `groups` groups (the creator first), drawn from the seed: between
/// [`GROUP_MEMBERS_MIN`] and [`GROUP_MEMBERS_MAX`] distinct users each (all of them when there
/// are fewer). Empty with fewer than two users.
pub fn group_plan(seed: u64, users: &[u64], groups: u32) -> Vec<Vec<u64>> {
    let mut rng = crate::seeded(seed, "groups");
    if users.len() < 2 {
        return Vec::new();
    }
    (0..groups.min(GROUPS_MAX))
        .map(|_| {
            let want = rng
                .gen_range(GROUP_MEMBERS_MIN..=GROUP_MEMBERS_MAX)
                .min(users.len());
            let mut pool = users.to_vec();
            let mut members = Vec::with_capacity(want);
            while members.len() < want {
                members.push(pool.swap_remove(rng.gen_range(0..pool.len())));
            }
            members
        })
        .collect()
}

/// One planned group message.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedGroup {
    pub at: Duration,
    /// Index into the groups `from` is a member of.
    pub group: usize,
    pub msg_id: MsgId,
    pub padding: usize,
}

/// The group send schedule of one device: Poisson arrivals at `rate` per second over
/// `window`, each to one of the `groups` it is a member of, all drawn from the seed.
pub fn group_schedule(
    seed: u64,
    from: Dev,
    groups: usize,
    rate: f64,
    window: Duration,
) -> Vec<PlannedGroup> {
    let mut rng = crate::seeded(seed, &format!("group-send-{from}"));
    if groups == 0 || rate <= 0.0 {
        return Vec::new();
    }
    poisson(&mut rng, rate, window, |rng, at| PlannedGroup {
        at,
        group: rng.gen_range(0..groups),
        msg_id: MsgId(rng.gen()),
        padding: rng.gen_range(0..=PADDING_BYTES_MAX),
    })
}

/// One planned membership change: at `at`, the group's creator removes `user` if it is a
/// member, else adds it back.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedChange {
    pub at: Duration,
    pub user: u64,
}

/// The membership changes of one group (`members`: the creator first, never changed), drawn
/// from the seed: `changes` of them at uniform times between 5% and 90% of `window`, so that
/// messages follow the last one.
pub fn change_schedule(
    seed: u64,
    group: MsgId,
    members: &[u64],
    changes: u32,
    window: Duration,
) -> Vec<PlannedChange> {
    let mut rng = crate::seeded(seed, &format!("group-changes-{group}"));
    if members.len() < 2 {
        return Vec::new();
    }
    let mut plan: Vec<PlannedChange> = (0..changes.min(GROUP_CHANGES_MAX))
        .map(|_| PlannedChange {
            at: window.mul_f64(rng.gen_range(0.05..0.9)),
            user: members[rng.gen_range(1..members.len())],
        })
        .collect();
    plan.sort_by_key(|c| c.at);
    plan
}

/// Every device of every member of `members` but `from` itself.
fn group_recipients(devices: &BTreeMap<u64, Vec<u32>>, from: Dev, members: &[u64]) -> Vec<Dev> {
    let mut out: Vec<Dev> = members
        .iter()
        .flat_map(|&user| {
            devices
                .get(&user)
                .into_iter()
                .flatten()
                .map(move |&device| Dev { user, device })
        })
        .filter(|d| *d != from)
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

fn parse_dev(s: &str) -> Option<Dev> {
    let (user, device) = s.split_once('.')?;
    Some(Dev {
        user: user.parse().ok()?,
        device: device.parse().ok()?,
    })
}

/// One planned message.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    pub at: Duration,
    pub to_user: u64,
    pub msg_id: MsgId,
    pub padding: usize,
}

/// The send schedule of one device: Poisson arrivals at `rate` per second over `window`, each to
/// a random other user, all drawn from the seed.
pub fn schedule(seed: u64, from: Dev, users: &[u64], rate: f64, window: Duration) -> Vec<Planned> {
    let mut rng = crate::seeded(seed, &format!("send-{from}"));
    let others: Vec<u64> = users.iter().copied().filter(|u| *u != from.user).collect();
    if others.is_empty() || rate <= 0.0 {
        return Vec::new();
    }
    poisson(&mut rng, rate, window, |rng, at| Planned {
        at,
        to_user: others[rng.gen_range(0..others.len())],
        msg_id: MsgId(rng.gen()),
        padding: rng.gen_range(0..=PADDING_BYTES_MAX),
    })
}

/// Poisson arrivals at `rate` per second over `window` (at most [`MESSAGES_PER_DEVICE_MAX`]):
/// each gap drawn from `rng` first (exponential: -ln(U)/rate), then the item `item` draws.
fn poisson<R: Rng, T>(
    rng: &mut R,
    rate: f64,
    window: Duration,
    mut item: impl FnMut(&mut R, Duration) -> T,
) -> Vec<T> {
    let mut plan = Vec::new();
    let mut t = 0.0f64;
    while plan.len() < MESSAGES_PER_DEVICE_MAX {
        let u: f64 = rng.gen_range(f64::MIN_POSITIVE..1.0);
        t += -u.ln() / rate;
        if t >= window.as_secs_f64() {
            break;
        }
        plan.push(item(rng, Duration::from_secs_f64(t)));
    }
    plan
}

/// Registers every user of the population (primary, then linked devices) and writes the
/// credentials file.
pub async fn register(spec: &WorkloadSpec) -> Result<()> {
    let config = spec.config();
    let mut credentials = Vec::new();
    // The primaries stay connected until the groups are made (their creators among them).
    let mut primaries = BTreeMap::new();
    for plan in &spec.population {
        let (primary, registered) =
            retry_register(|| dev::register_device(config.clone(), plan.user, &spec.codes_file))
                .await
                .with_context(|| format!("registering {}", plan.user))?;
        credentials.push(Credential {
            user: registered.user,
            device: registered.device,
            token: hex::encode(&registered.token),
            host: plan.host.clone(),
            node: Some(primary.welcome().node_id),
        });
        for _ in 1..plan.devices {
            let (linked, registered) =
                retry_register(|| dev::link_device(config.clone(), &primary))
                    .await
                    .with_context(|| format!("linking a device to {}", plan.user))?;
            credentials.push(Credential {
                user: registered.user,
                device: registered.device,
                token: hex::encode(&registered.token),
                host: plan.host.clone(),
                node: Some(linked.welcome().node_id),
            });
            linked.close().await;
        }
        primaries.insert(plan.user, (primary, registered.device));
    }
    let users: Vec<u64> = spec.population.iter().map(|p| p.user).collect();
    let mut groups = Vec::new();
    for members in group_plan(spec.seed, &users, spec.groups) {
        let creator = members[0];
        let Some((client, device)) = primaries.get(&creator) else {
            continue;
        };
        let others: Vec<u64> = members[1..].to_vec();
        let info =
            retry_register(|| client.group_create(others.clone(), Bytes::from_static(b"chaos")))
                .await
                .with_context(|| format!("creating a group of {members:?}"))?;
        groups.push(GroupRecord {
            group: MsgId(info.group),
            members,
            creator: Dev {
                user: creator,
                device: *device,
            },
        });
    }
    for (client, _) in primaries.into_values() {
        client.close().await;
    }
    let tmp = spec.groups_file().with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&groups)?)?;
    std::fs::rename(&tmp, spec.groups_file())?;
    let tmp = spec.credentials.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&credentials)?)?;
    std::fs::rename(&tmp, &spec.credentials)?;
    Ok(())
}

async fn retry_register<F, Fut, T>(mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ringpost_client::Result<T>>,
{
    let mut last = None;
    for attempt in 0..REGISTER_ATTEMPTS_MAX {
        match tokio::time::timeout(CONNECT_TIMEOUT, f()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => last = Some(e.to_string()),
            Err(_) => last = Some("timed out".into()),
        }
        tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
    }
    bail!("{}", last.unwrap_or_default())
}

/// Reads the groups file `--register` wrote (none if it wrote none).
pub fn read_groups(path: &Path) -> Result<Vec<GroupRecord>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(serde_json::from_slice(&bytes)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Reads a credentials file.
pub fn read_credentials(path: &Path) -> Result<Vec<Credential>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_json::from_slice(&bytes)?)
}

fn code_of(e: &ClientError) -> Option<u16> {
    match e {
        ClientError::Server { code, .. } => Some(code.as_u16()),
        _ => None,
    }
}

fn status_name(status: SendStatus) -> String {
    format!("{status:?}")
}

/// Runs this host's devices until the stop file appears or the deadline passes.
pub async fn run(spec: WorkloadSpec) -> Result<()> {
    let clock = Clock::new();
    let history = Arc::new(HistoryWriter::create(&spec.history, &spec.host, clock)?);
    let credentials = read_credentials(&spec.credentials)?;
    // Every user's devices, for recipient lists.
    let mut devices: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for c in &credentials {
        devices.entry(c.user).or_default().push(c.device);
    }
    for list in devices.values_mut() {
        list.sort_unstable();
    }
    let users: Vec<u64> = devices.keys().copied().collect();
    let groups = Arc::new(read_groups(&spec.groups_file())?);
    if spec.host == "client1" {
        for g in groups.iter() {
            history.record(Event::Group {
                group: g.group,
                members: g.members.clone(),
                creator: g.creator,
            });
        }
    }
    let mine: Vec<&Credential> = credentials.iter().filter(|c| c.host == spec.host).collect();
    let spec = Arc::new(spec);
    let devices = Arc::new(devices);

    let mut tasks = tokio::task::JoinSet::new();
    let mut senders = tokio::task::JoinSet::new();
    for cred in mine {
        let dev = Dev {
            user: cred.user,
            device: cred.device,
        };
        history.record(Event::Device {
            dev,
            host: spec.host.clone(),
        });
        let token = hex::decode(&cred.token).context("credential token")?;
        let config = spec.config().with_auth(Auth {
            user: cred.user,
            device: cred.device,
            token: Bytes::from(token),
        });
        let client = connect_with_retry(config, &spec).await?;
        history.record(Event::Connection {
            at: dev,
            up: true,
            reason: "connect".into(),
            node: Some(client.welcome().node_id),
        });
        let (receipts_tx, receipts_rx) = mpsc::channel(RECEIPT_QUEUE_MAX);
        tasks.spawn(receive(
            client.clone(),
            dev,
            spec.clone(),
            history.clone(),
            receipts_tx,
        ));
        tasks.spawn(send_receipts(
            client.clone(),
            dev,
            spec.clone(),
            history.clone(),
            devices.clone(),
            receipts_rx,
        ));
        let plan = schedule(
            spec.seed,
            dev,
            &users,
            spec.rate_per_device,
            Duration::from_millis(spec.send_ms),
        );
        let my_groups: Vec<GroupRecord> = groups
            .iter()
            .filter(|g| g.members.contains(&dev.user))
            .cloned()
            .collect();
        let group_plan = group_schedule(
            spec.seed,
            dev,
            my_groups.len(),
            spec.rate_per_device * GROUP_RATE_FRACTION,
            Duration::from_millis(spec.send_ms),
        );
        for g in my_groups.iter().filter(|g| g.creator == dev) {
            let plan = change_schedule(
                spec.seed,
                g.group,
                &g.members,
                spec.group_changes,
                Duration::from_millis(spec.send_ms),
            );
            senders.spawn(change_group(
                client.clone(),
                dev,
                g.clone(),
                plan,
                spec.clone(),
                history.clone(),
            ));
        }
        senders.spawn(send_groups(
            client.clone(),
            dev,
            my_groups,
            group_plan,
            spec.clone(),
            history.clone(),
            devices.clone(),
        ));
        senders.spawn(send(
            client,
            dev,
            plan,
            spec.clone(),
            history.clone(),
            devices.clone(),
        ));
    }
    history.record(Event::Workload {
        host: spec.host.clone(),
        phase: "sending".into(),
    });
    while let Some(done) = senders.join_next().await {
        done.context("a sender panicked")?;
    }
    history.record(Event::Workload {
        host: spec.host.clone(),
        phase: "sending_done".into(),
    });
    while let Some(done) = tasks.join_next().await {
        done.context("a receiver panicked")?;
    }
    history.record(Event::Workload {
        host: spec.host.clone(),
        phase: "end".into(),
    });
    Ok(())
}

async fn connect_with_retry(config: ClientConfig, spec: &WorkloadSpec) -> Result<Client> {
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    loop {
        match Client::connect(config.clone()).await {
            Ok(client) => return Ok(client),
            Err(e) if tokio::time::Instant::now() >= deadline || e.is_terminal() => {
                bail!("connecting to {}: {e}", spec.url)
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

fn now_us(clock: &Clock) -> u64 {
    clock.now_us()
}

fn should_stop(spec: &WorkloadSpec, clock: &Clock) -> bool {
    now_us(clock) >= spec.deadline_us || spec.stop_file.exists()
}

fn recipients_of(devices: &BTreeMap<u64, Vec<u32>>, from: Dev, to_user: u64) -> Vec<Dev> {
    let mut out: Vec<Dev> = devices
        .get(&to_user)
        .into_iter()
        .flatten()
        .map(|&device| Dev {
            user: to_user,
            device,
        })
        .collect();
    out.extend(
        devices
            .get(&from.user)
            .into_iter()
            .flatten()
            .filter(|&&d| d != from.device)
            .map(|&device| Dev {
                user: from.user,
                device,
            }),
    );
    out
}

/// Sends one message until it is answered: each attempt (recorded by `attempt` itself) gets
/// [`REQUEST_TIMEOUT`]; errors are recorded and retried with the same msg_id after a doubling
/// pause (at least the server's `retry_after`), until [`SEND_ATTEMPTS_MAX`] attempts, the retry
/// deadline or the run's stop, when the message is recorded as abandoned.
struct Retry<'a> {
    history: &'a HistoryWriter,
    spec: &'a WorkloadSpec,
    clock: &'a Clock,
    from: Dev,
    msg_id: MsgId,
    until_us: u64,
    /// A `Forbidden` answer ends the retries (a group send from a member removed meanwhile:
    /// no retry can succeed).
    forbidden_is_final: bool,
}

impl Retry<'_> {
    /// `false` when the device can send nothing more (its client is closed for good).
    async fn until_answered<F, Fut>(&self, mut attempt: F) -> bool
    where
        F: FnMut(u32) -> Fut,
        Fut: std::future::Future<Output = Result<ringpost_client::SendAck, ClientError>>,
    {
        let (from, msg_id, history) = (self.from, self.msg_id, self.history);
        let abandoned = |attempts| Event::SendAbandoned {
            from,
            msg_id,
            attempts,
        };
        let mut pause = RETRY_PAUSE;
        let mut n = 0;
        loop {
            n += 1;
            let answer = tokio::time::timeout(REQUEST_TIMEOUT, attempt(n)).await;
            let mut wait = pause;
            match answer {
                Ok(Ok(ack)) => {
                    history.record(Event::SendAck {
                        from,
                        msg_id,
                        attempt: n,
                        status: status_name(ack.status),
                        server_time_ms: ack.server_time_ms,
                        group_seq: ack.group_seq,
                    });
                    // Ok is final; so is a refusal (the device lists never change in a run).
                    return true;
                }
                Ok(Err(e)) => {
                    if let Some(after) = e.retry_after() {
                        wait = wait.max(after);
                    }
                    history.record(Event::SendError {
                        from,
                        msg_id,
                        attempt: n,
                        error: e.to_string(),
                        code: code_of(&e),
                    });
                    if e.is_terminal() {
                        // The client is closed for good (its device's account is gone, e.g.
                        // with a removed node): nothing this device sends can work any more.
                        history.record(abandoned(n));
                        return false;
                    }
                    if self.forbidden_is_final && code_of(&e) == Some(ErrorCode::Forbidden.as_u16())
                    {
                        history.record(abandoned(n));
                        return true;
                    }
                }
                Err(_) => {
                    history.record(Event::SendError {
                        from,
                        msg_id,
                        attempt: n,
                        error: "timed out".into(),
                        code: None,
                    });
                }
            }
            if n >= SEND_ATTEMPTS_MAX
                || self.clock.now_us() >= self.until_us
                || should_stop(self.spec, self.clock)
            {
                history.record(abandoned(n));
                return true;
            }
            tokio::time::sleep(wait).await;
            pause = (pause * 2).min(RETRY_PAUSE_MAX);
        }
    }
}

/// Sends one device's schedule, in order, each message until it is answered.
async fn send(
    client: Client,
    from: Dev,
    plan: Vec<Planned>,
    spec: Arc<WorkloadSpec>,
    history: Arc<HistoryWriter>,
    devices: Arc<BTreeMap<u64, Vec<u32>>>,
) {
    let clock = history.clock();
    let start_us = spec.start_at_us;
    let window_end_us = start_us + spec.send_ms * 1_000;
    let retry_until_us = window_end_us + RETRY_GRACE.as_micros() as u64;
    for planned in plan {
        let due_us = start_us + planned.at.as_micros() as u64;
        let now = clock.now_us();
        if due_us > now {
            tokio::time::sleep(Duration::from_micros(due_us - now)).await;
        }
        if clock.now_us() >= window_end_us || should_stop(&spec, &clock) {
            break;
        }
        let recipients = recipients_of(&devices, from, planned.to_user);
        let ciphertexts: Vec<DeviceCiphertext> = recipients
            .iter()
            .map(|to| DeviceCiphertext {
                user: to.user,
                device: to.device,
                body: body_for(*to, planned.msg_id, from, planned.padding),
            })
            .collect();
        let attempt = |attempt: u32| {
            history.record(Event::Send {
                from,
                to_user: planned.to_user,
                msg_id: planned.msg_id,
                attempt,
                recipients: recipients.clone(),
            });
            client.send(planned.to_user, planned.msg_id.0, ciphertexts.clone())
        };
        let retry = Retry {
            history: &history,
            spec: &spec,
            clock: &clock,
            from,
            msg_id: planned.msg_id,
            until_us: retry_until_us,
            forbidden_is_final: false,
        };
        if !retry.until_answered(attempt).await {
            return;
        }
    }
}

/// Sends one device's group schedule, in order, each message until it is answered (retried
/// with the same msg_id, like [`send`]; on its own task, so the 1:1 sends keep their order).
async fn send_groups(
    client: Client,
    from: Dev,
    groups: Vec<GroupRecord>,
    plan: Vec<PlannedGroup>,
    spec: Arc<WorkloadSpec>,
    history: Arc<HistoryWriter>,
    devices: Arc<BTreeMap<u64, Vec<u32>>>,
) {
    let clock = history.clock();
    let start_us = spec.start_at_us;
    let window_end_us = start_us + spec.send_ms * 1_000;
    let retry_until_us = window_end_us + RETRY_GRACE.as_micros() as u64;
    for planned in plan {
        let Some(group) = groups.get(planned.group) else {
            continue;
        };
        let due_us = start_us + planned.at.as_micros() as u64;
        let now = clock.now_us();
        if due_us > now {
            tokio::time::sleep(Duration::from_micros(due_us - now)).await;
        }
        if clock.now_us() >= window_end_us || should_stop(&spec, &clock) {
            break;
        }
        let recipients = group_recipients(&devices, from, &group.members);
        let body = group_body(group.group, planned.msg_id, from, planned.padding);
        let attempt = |attempt: u32| {
            history.record(Event::GroupSend {
                from,
                group: group.group,
                msg_id: planned.msg_id,
                attempt,
                recipients: recipients.clone(),
            });
            client.group_send(group.group.0, planned.msg_id.0, body.clone())
        };
        let retry = Retry {
            history: &history,
            spec: &spec,
            clock: &clock,
            from,
            msg_id: planned.msg_id,
            until_us: retry_until_us,
            forbidden_is_final: true,
        };
        if !retry.until_answered(attempt).await {
            return;
        }
    }
}

/// Makes one group's planned membership changes from its creator's device, each retried until
/// answered (a retry of a change already made is answered with the group as it is, and
/// changes nothing). Stops changing the group after a change it had to abandon: its members
/// are then known only from the events the devices received.
async fn change_group(
    client: Client,
    by: Dev,
    group: GroupRecord,
    plan: Vec<PlannedChange>,
    spec: Arc<WorkloadSpec>,
    history: Arc<HistoryWriter>,
) {
    let clock = history.clock();
    let start_us = spec.start_at_us;
    let window_end_us = start_us + spec.send_ms * 1_000;
    let retry_until_us = window_end_us + RETRY_GRACE.as_micros() as u64;
    let mut members: BTreeSet<u64> = group.members.iter().copied().collect();
    for change in plan {
        let due_us = start_us + change.at.as_micros() as u64;
        let now = clock.now_us();
        if due_us > now {
            tokio::time::sleep(Duration::from_micros(due_us - now)).await;
        }
        if clock.now_us() >= window_end_us || should_stop(&spec, &clock) {
            return;
        }
        let (add, remove) = if members.contains(&change.user) {
            (vec![], vec![change.user])
        } else {
            (vec![change.user], vec![])
        };
        let mut pause = RETRY_PAUSE;
        let mut n = 0;
        loop {
            n += 1;
            history.record(Event::GroupChange {
                by,
                group: group.group,
                attempt: n,
                add: add.clone(),
                remove: remove.clone(),
            });
            let mut update = ringpost_client::wire::GroupUpdate::new(group.group.0);
            update.add = add.clone();
            update.remove = remove.clone();
            let mut wait = pause;
            let error =
                match tokio::time::timeout(REQUEST_TIMEOUT, client.group_update(update)).await {
                    Ok(Ok(info)) => {
                        history.record(Event::GroupChanged {
                            by,
                            group: group.group,
                            attempt: n,
                            version: info.version,
                            members: info.members.clone(),
                        });
                        members = info.members.into_iter().collect();
                        break;
                    }
                    Ok(Err(e)) => {
                        if let Some(after) = e.retry_after() {
                            wait = wait.max(after);
                        }
                        (e.to_string(), e.is_terminal())
                    }
                    Err(_) => ("timed out".to_string(), false),
                };
            history.record(Event::GroupChangeError {
                by,
                group: group.group,
                attempt: n,
                error: error.0,
            });
            if error.1
                || n >= SEND_ATTEMPTS_MAX
                || clock.now_us() >= retry_until_us
                || should_stop(&spec, &clock)
            {
                history.record(Event::GroupChangeAbandoned {
                    by,
                    group: group.group,
                    add,
                    remove,
                });
                return;
            }
            tokio::time::sleep(wait).await;
            pause = (pause * 2).min(RETRY_PAUSE_MAX);
        }
    }
}

/// A read receipt to send: for which message, to which user.
struct ReceiptJob {
    to_user: u64,
    msg_id: MsgId,
}

/// Receives and acks until stopped; queues read receipts for some messages.
async fn receive(
    client: Client,
    at: Dev,
    spec: Arc<WorkloadSpec>,
    history: Arc<HistoryWriter>,
    receipts: mpsc::Sender<ReceiptJob>,
) {
    let clock = history.clock();
    // `next_event` is never cancelled here (no timeout around it): a call dropped while it
    // writes acks loses the delivery it already counted as seen. Instead a stopper closes the
    // client when the run is over, and `next_event` then drains and returns `None`.
    let stopper = {
        let client = client.clone();
        let spec = spec.clone();
        tokio::spawn(async move {
            while !should_stop(&spec, &clock) {
                tokio::time::sleep(STOP_POLL).await;
            }
            client.close().await;
        })
    };
    while let Some(event) = client.next_event().await {
        let mut ack = None;
        match event {
            SdkEvent::Message(d) => {
                let msg_id = MsgId(d.msg_id);
                let from = Dev {
                    user: d.from_user,
                    device: d.from_device,
                };
                history.record(Event::Deliver {
                    at,
                    seq: d.seq,
                    msg_id,
                    from,
                    body: parse_body(&d.body),
                });
                ack = Some(d.seq);
                if from.user != at.user && wants_receipt(&spec, at, msg_id) {
                    let _ = receipts.try_send(ReceiptJob {
                        to_user: from.user,
                        msg_id,
                    });
                }
            }
            SdkEvent::GroupMessage(d) => {
                history.record(Event::GroupDeliver {
                    at,
                    seq: d.seq,
                    group: MsgId(d.group.unwrap_or_default()),
                    group_seq: d.group_seq,
                    msg_id: MsgId(d.msg_id),
                    from: Dev {
                        user: d.from_user,
                        device: d.from_device,
                    },
                    body: parse_group_body(&d.body),
                });
                ack = Some(d.seq);
            }
            SdkEvent::GroupChanged {
                seq,
                group,
                group_seq,
                event,
            } => {
                // An event that does not decode is not recorded: the checker then misses a
                // change every member was owed.
                if let Some(e) = event {
                    history.record(Event::GroupEventDeliver {
                        at,
                        seq,
                        group: MsgId(group),
                        group_seq,
                        actor: e.actor,
                        added: e.added,
                        removed: e.removed,
                    });
                }
                ack = Some(seq);
            }
            // Aggregated group receipts: acked, not checked.
            SdkEvent::GroupReceipt { seq, .. } => {
                ack = Some(seq);
            }
            SdkEvent::Delivered {
                seq,
                by_user,
                by_device,
                msg_ids,
                ..
            } => {
                ack = Some(seq);
                record_receipt(&history, at, "delivered", by_user, by_device, msg_ids, seq);
            }
            SdkEvent::Read {
                seq,
                by_user,
                by_device,
                msg_ids,
                ..
            } => {
                ack = Some(seq);
                record_receipt(&history, at, "read", by_user, by_device, msg_ids, seq);
            }
            SdkEvent::Disconnected { reason, .. } => {
                history.record(Event::Connection {
                    at,
                    up: false,
                    reason,
                    node: None,
                });
            }
            SdkEvent::Reconnected {
                reconnects,
                welcome,
            } => {
                history.record(Event::Connection {
                    at,
                    up: true,
                    reason: format!("reconnect #{reconnects}"),
                    node: Some(welcome.node_id),
                });
            }
            _ => {}
        }
        if let Some(seq) = ack {
            let ok = client.ack(&[seq]).await.is_ok();
            history.record(Event::Ack {
                at,
                seqs: vec![seq],
                ok,
            });
        }
    }
    if !should_stop(&spec, &clock) {
        // The SDK gave up reconnecting (RECONNECT_ATTEMPTS_MAX in a row): the device is gone
        // for the rest of the run, and what it misses shows as lost.
        history.record(Event::Connection {
            at,
            up: false,
            reason: "the client gave up reconnecting".into(),
            node: None,
        });
    }
    stopper.abort();
}

fn record_receipt(
    history: &HistoryWriter,
    at: Dev,
    kind: &str,
    by_user: u64,
    by_device: u32,
    msg_ids: Vec<[u8; 16]>,
    seq: u64,
) {
    history.record(Event::Receipt {
        at,
        kind: kind.into(),
        by: Dev {
            user: by_user,
            device: by_device,
        },
        msg_ids: msg_ids.into_iter().map(MsgId).collect(),
        seq,
    });
}

/// Whether `at` answers `msg_id` with a read receipt: a seeded coin per (device, message).
fn wants_receipt(spec: &WorkloadSpec, at: Dev, msg_id: MsgId) -> bool {
    let mut rng = crate::seeded(spec.seed, &format!("receipt-{at}-{msg_id}"));
    rng.gen_bool(spec.receipt_fraction.clamp(0.0, 1.0))
}

/// Sends queued read receipts one at a time, each until answered (bounded like sends).
async fn send_receipts(
    client: Client,
    from: Dev,
    spec: Arc<WorkloadSpec>,
    history: Arc<HistoryWriter>,
    devices: Arc<BTreeMap<u64, Vec<u32>>>,
    mut jobs: mpsc::Receiver<ReceiptJob>,
) {
    let clock = history.clock();
    let window_end_us = spec.start_at_us + spec.send_ms * 1_000;
    let retry_until_us = window_end_us + RETRY_GRACE.as_micros() as u64;
    loop {
        let job = match tokio::time::timeout(STOP_POLL, jobs.recv()).await {
            Err(_) if should_stop(&spec, &clock) => return,
            Err(_) => continue,
            Ok(None) => return,
            Ok(Some(job)) => job,
        };
        // No new receipts after the sending window: the run is settling.
        if clock.now_us() >= window_end_us {
            continue;
        }
        let mut id_rng = crate::seeded(spec.seed, &format!("receipt-id-{from}-{}", job.msg_id));
        let receipt_id = MsgId(id_rng.gen());
        let recipients: Vec<Dev> = devices
            .get(&job.to_user)
            .into_iter()
            .flatten()
            .map(|&device| Dev {
                user: job.to_user,
                device,
            })
            .collect();
        history.record(Event::ReceiptSend {
            from,
            to_user: job.to_user,
            receipt_id,
            msg_ids: vec![job.msg_id],
            recipients,
        });
        let mut pause = RETRY_PAUSE;
        for _ in 0..SEND_ATTEMPTS_MAX {
            let answer = tokio::time::timeout(
                REQUEST_TIMEOUT,
                client.receipt(
                    job.to_user,
                    receipt_id.0,
                    ReceiptKind::Read,
                    vec![job.msg_id.0],
                ),
            )
            .await;
            match answer {
                Ok(Ok(ack)) => {
                    history.record(Event::ReceiptAck {
                        from,
                        receipt_id,
                        status: status_name(ack.status),
                    });
                    break;
                }
                Ok(Err(e)) => {
                    history.record(Event::ReceiptAck {
                        from,
                        receipt_id,
                        status: format!("error: {e}"),
                    });
                }
                Err(_) => {
                    history.record(Event::ReceiptAck {
                        from,
                        receipt_id,
                        status: "error: timed out".into(),
                    });
                }
            }
            if clock.now_us() >= retry_until_us || should_stop(&spec, &clock) {
                break;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(RETRY_PAUSE_MAX);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_name_their_device_and_message() {
        let to = Dev {
            user: 15550002,
            device: 3,
        };
        let from = Dev {
            user: 15550001,
            device: 1,
        };
        let body = body_for(to, MsgId([0xab; 16]), from, 40);
        let tag = parse_body(&body).unwrap();
        assert_eq!(tag.to, to);
        assert_eq!(tag.msg_id, MsgId([0xab; 16]));
        assert_eq!(parse_body(b"something else"), None);
        assert_eq!(parse_body(b""), None);
    }

    #[test]
    fn schedules_are_fixed_by_the_seed_and_bounded() {
        let from = Dev { user: 1, device: 1 };
        let users = [1, 2, 3];
        let a = schedule(42, from, &users, 5.0, Duration::from_secs(20));
        let b = schedule(42, from, &users, 5.0, Duration::from_secs(20));
        let c = schedule(43, from, &users, 5.0, Duration::from_secs(20));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!((60..160).contains(&a.len()), "about 100: {}", a.len());
        assert!(a
            .iter()
            .all(|p| p.to_user != 1 && p.at < Duration::from_secs(20)));
        assert!(a.windows(2).all(|w| w[0].at <= w[1].at));
        let huge = schedule(1, from, &users, 1e9, Duration::from_secs(1));
        assert_eq!(huge.len(), MESSAGES_PER_DEVICE_MAX);
        assert!(schedule(1, from, &[1], 5.0, Duration::from_secs(1)).is_empty());
    }

    #[test]
    fn recipients_are_the_other_users_devices_and_our_other_devices() {
        let mut devices = BTreeMap::new();
        devices.insert(1, vec![1, 2]);
        devices.insert(2, vec![1, 2, 3]);
        let got = recipients_of(&devices, Dev { user: 1, device: 2 }, 2);
        let want: Vec<Dev> = [(2, 1), (2, 2), (2, 3), (1, 1)]
            .iter()
            .map(|&(user, device)| Dev { user, device })
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn group_bodies_name_their_group_and_message() {
        let from = Dev { user: 1, device: 2 };
        let body = group_body(MsgId([3; 16]), MsgId([4; 16]), from, 10);
        let tag = parse_group_body(&body).unwrap();
        assert_eq!((tag.group, tag.msg_id), (MsgId([3; 16]), MsgId([4; 16])));
        assert_eq!(parse_group_body(b"rp1 1.1 x"), None);
        assert_eq!(parse_group_body(b"rpg1 zz"), None);
        // A 1:1 body is not a group body, nor the other way round.
        assert_eq!(parse_body(&body), None);
    }

    #[test]
    fn group_plans_are_fixed_by_the_seed_and_bounded() {
        let users: Vec<u64> = (1..=12).collect();
        let a = group_plan(7, &users, 3);
        assert_eq!(a, group_plan(7, &users, 3));
        assert_eq!(a.len(), 3);
        for members in &a {
            assert!((GROUP_MEMBERS_MIN..=GROUP_MEMBERS_MAX).contains(&members.len()));
            let mut sorted = members.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), members.len(), "distinct members: {members:?}");
        }
        assert_eq!(group_plan(7, &[1, 2, 3], 2)[0].len(), 3);
        assert!(group_plan(7, &[1], 2).is_empty());
        assert_eq!(group_plan(7, &users, 1000).len(), GROUPS_MAX as usize);
        assert!(group_plan(7, &users, 0).is_empty());

        let from = Dev { user: 1, device: 1 };
        let s = group_schedule(7, from, 2, 1.0, Duration::from_secs(20));
        assert_eq!(s, group_schedule(7, from, 2, 1.0, Duration::from_secs(20)));
        assert!(s.iter().all(|p| p.group < 2));
        assert!(group_schedule(7, from, 0, 1.0, Duration::from_secs(20)).is_empty());
    }

    #[test]
    fn group_recipients_are_every_member_device_but_the_sender() {
        let mut devices = BTreeMap::new();
        devices.insert(1, vec![1, 2]);
        devices.insert(2, vec![1]);
        devices.insert(3, vec![1]);
        let got = group_recipients(&devices, Dev { user: 1, device: 2 }, &[2, 1]);
        let want: Vec<Dev> = [(1, 1), (2, 1)]
            .iter()
            .map(|&(user, device)| Dev { user, device })
            .collect();
        assert_eq!(got, want);
    }
}
