//! The history: what happened during a run, one JSON object per line.
//!
//! Every process of a run writes its own file (each workload process, and the orchestrator for
//! faults and node processes); [`merge`] sorts them into one `history.jsonl` by time. Each line
//! is a [`Record`]: when (`t_us`, Unix microseconds from a monotonic clock anchored once per
//! process, so a writer's own lines never go back in time), who wrote it (`src`, and `n`, the
//! writer's line counter) and the [`Event`], tagged by `type`.
//!
//! ```text
//! {"t_us":1700000000000000,"src":"c1","n":7,"type":"send","from":{"user":15550001,"device":1},...}
//! ```
//!
//! The checker ([`crate::check`]) reads nothing else, so a history written by another tool (or
//! by hand, as the checker's tests do) is checked the same way.

use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Longest history line read, in bytes. A line holds one event; the largest (a `send` with ten
/// recipients) is well under 2 KiB.
pub const LINE_BYTES_MAX: usize = 64 * 1024;

/// Most events one history may hold (all files of a run together). A run sends at most
/// [`crate::workload::MESSAGES_PER_DEVICE_MAX`] per device, each producing a handful of events;
/// the checker holds them all in memory, about 300 bytes each (600 MiB at this bound).
pub const EVENTS_MAX: usize = 2_000_000;

/// A device: a user (E.164 number as an integer) and its device id (1 is the primary).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Dev {
    pub user: u64,
    pub device: u32,
}

impl std::fmt::Display for Dev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.user, self.device)
    }
}

/// A 16-byte message id, written as 32 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MsgId(pub [u8; 16]);

impl std::fmt::Display for MsgId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::str::FromStr for MsgId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut id = [0u8; 16];
        hex::decode_to_slice(s, &mut id).map_err(|e| format!("msg_id {s:?}: {e}"))?;
        Ok(MsgId(id))
    }
}

impl Serialize for MsgId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for MsgId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Start or end of a fault window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Start,
    End,
}

/// What the ciphertext a device received says about itself: the workload writes the intended
/// recipient device and the message id into every ciphertext, so a device handed another
/// device's ciphertext (or another message's) shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BodyTag {
    pub to: Dev,
    pub msg_id: MsgId,
}

/// What a group ciphertext says about itself: the workload writes the group and the message id
/// into every group message (one ciphertext serves every member, so it names no device).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupBodyTag {
    pub group: MsgId,
    pub msg_id: MsgId,
}

/// One thing that happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// The run: scenario, seed and mode (first line of a merged history).
    Meta {
        scenario: String,
        seed: u64,
        mode: String,
    },
    /// A device taking part in the workload.
    Device { dev: Dev, host: String },
    /// One attempt to send a 1:1 message. `recipients` are the devices it carries a ciphertext
    /// for: every device of `to_user` and every other device of the sender.
    Send {
        from: Dev,
        to_user: u64,
        msg_id: MsgId,
        attempt: u32,
        recipients: Vec<Dev>,
    },
    /// A group the workload created before the run (`--register`): its id (16 bytes, hex like a
    /// msg_id), its members (the creator first), and the device that created it.
    Group {
        group: MsgId,
        members: Vec<u64>,
        creator: Dev,
    },
    /// One attempt to send a group message (`GroupSend`). `recipients` are every device of
    /// every member but the sending device. Its answer is a `send_ack` or `send_error` (and
    /// perhaps a `send_abandoned`) with the same `from` and `msg_id`, as for a 1:1 send.
    GroupSend {
        from: Dev,
        group: MsgId,
        msg_id: MsgId,
        attempt: u32,
        recipients: Vec<Dev>,
    },
    /// The node's `SendAck` for an attempt (1:1 or group): `status` is `Ok` (durable) or the refusal
    /// (`MismatchedDevices`, `InboxFull`, `UnknownUser`: nothing stored).
    SendAck {
        from: Dev,
        msg_id: MsgId,
        attempt: u32,
        status: String,
        /// The node's clock when it answered (shows clock skew).
        #[serde(default)]
        server_time_ms: u64,
        /// A group message's place in its group's order (`SendAck.group_seq`); 0 for 1:1.
        #[serde(default)]
        group_seq: u64,
    },
    /// An attempt that got no `SendAck`: an `Error` answer (`code`), a disconnect or a timeout.
    /// The message may or may not be stored.
    SendError {
        from: Dev,
        msg_id: MsgId,
        attempt: u32,
        error: String,
        code: Option<u16>,
    },
    /// The workload stopped retrying a message without an `Ok`.
    SendAbandoned {
        from: Dev,
        msg_id: MsgId,
        attempts: u32,
    },
    /// A message handed to the application on device `at` (after the SDK's dedup).
    Deliver {
        at: Dev,
        seq: u64,
        msg_id: MsgId,
        from: Dev,
        /// What the ciphertext says; `None` if it is not one the workload wrote.
        body: Option<BodyTag>,
    },
    /// A group message handed to the application on device `at` (after the SDK's dedup).
    GroupDeliver {
        at: Dev,
        seq: u64,
        group: MsgId,
        group_seq: u64,
        msg_id: MsgId,
        from: Dev,
        /// What the ciphertext says; `None` if it is not one the workload wrote.
        body: Option<GroupBodyTag>,
    },
    /// A group change handed to the application on device `at` (a `Deliver` of kind
    /// `GroupEvent`): who the change at `group_seq` added and removed.
    GroupEventDeliver {
        at: Dev,
        seq: u64,
        group: MsgId,
        group_seq: u64,
        actor: u64,
        added: Vec<u64>,
        removed: Vec<u64>,
    },
    /// One attempt at a membership change (`GroupUpdate`) by the group's creator.
    GroupChange {
        by: Dev,
        group: MsgId,
        attempt: u32,
        add: Vec<u64>,
        remove: Vec<u64>,
    },
    /// The answer to a membership change: the group's members after it, at `version` (the
    /// group seq of the change, or a later one when a retry found it already made).
    GroupChanged {
        by: Dev,
        group: MsgId,
        attempt: u32,
        version: u64,
        members: Vec<u64>,
    },
    /// A membership change attempt that got no answer (an `Error`, a disconnect, a timeout):
    /// it may or may not have been made.
    GroupChangeError {
        by: Dev,
        group: MsgId,
        attempt: u32,
        error: String,
    },
    /// The creator stopped retrying a membership change without an answer: whether it was
    /// made is known only from the members' `GroupEventDeliver`s.
    GroupChangeAbandoned {
        by: Dev,
        group: MsgId,
        add: Vec<u64>,
        remove: Vec<u64>,
    },
    /// The application acknowledged these deliveries (`ok`: the ack was written).
    Ack { at: Dev, seqs: Vec<u64>, ok: bool },
    /// A read receipt sent (routed like a message to every device of `to_user`).
    ReceiptSend {
        from: Dev,
        to_user: u64,
        receipt_id: MsgId,
        msg_ids: Vec<MsgId>,
        recipients: Vec<Dev>,
    },
    /// The `SendAck` (or error, `status` = `error: ...`) of a read receipt.
    ReceiptAck {
        from: Dev,
        receipt_id: MsgId,
        status: String,
    },
    /// A receipt handed to the application on `at`: `kind` is `delivered` (made by the node when
    /// `by` first acked) or `read` (sent by `by`'s client).
    Receipt {
        at: Dev,
        kind: String,
        by: Dev,
        msg_ids: Vec<MsgId>,
        seq: u64,
    },
    /// A device's connection dropped (`up: false`) or came up (`up: true`: the first connect
    /// or a reconnect). `node` is the node that welcomed it: in a cluster every device sits on
    /// its user's owner, so this is where the user's inbox lived at that moment.
    Connection {
        at: Dev,
        up: bool,
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        node: Option<u64>,
    },
    /// A fault window opens or closes. `id` pairs the two.
    Fault {
        id: u32,
        kind: String,
        phase: Phase,
        target: String,
        detail: String,
    },
    /// A node process: `start`, `ready`, `kill`, `stop`, `cont`, `exit`, `term`.
    Process {
        node: String,
        action: String,
        pid: u32,
        detail: String,
    },
    /// A cluster membership step the orchestrator took or saw, by node id (see
    /// [`MemberAction`]): a node started or joined, a drain, a kill -9 without restart, the
    /// coordinator marking it down, `ctl remove`. The checker uses `kill` and `remove` to tell
    /// losses of data that lived only on a removed node from other losses.
    Member {
        node_id: u64,
        action: MemberAction,
        detail: String,
    },
    /// A workload phase: `sending`, `sending_done`, `end`.
    Workload { host: String, phase: String },
}

/// What happened to a cluster member ([`Event::Member`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberAction {
    /// The node process started and printed that it is ready (a first start, a join, a
    /// restart, a re-join with a fresh data dir).
    Ready,
    /// `ctl drain`: its shards are being handed to the others.
    Drain,
    /// A drained node exited 0 after handing everything off.
    Left,
    /// SIGKILL, not restarted: whatever lived only on it is gone with it unless it comes back.
    Kill,
    /// The coordinator marked it down (missed heartbeats).
    Down,
    /// The coordinator marked it active again after it was down, the same process
    /// heartbeating again (`coord-partition` healed).
    Active,
    /// `ctl remove`: it is forgotten and its unreplicated data given up.
    Remove,
}

/// One line of a history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub t_us: u64,
    pub src: String,
    pub n: u64,
    #[serde(flatten)]
    pub event: Event,
}

/// Microseconds since the Unix epoch, monotonic within a process: the wall clock is read once
/// and advanced by `Instant`, so a clock step during the run does not reorder a writer's lines.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base_us: u64,
    anchor: Instant,
}

impl Clock {
    pub fn new() -> Self {
        let base_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        Clock {
            base_us,
            anchor: Instant::now(),
        }
    }

    pub fn now_us(&self) -> u64 {
        let elapsed = u64::try_from(self.anchor.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.base_us.saturating_add(elapsed)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// Appends records to one history file, one flushed line each (a writer killed mid-run leaves
/// only whole lines behind, except perhaps the last, which readers skip).
pub struct HistoryWriter {
    src: String,
    clock: Clock,
    inner: Mutex<WriterInner>,
}

struct WriterInner {
    file: std::io::BufWriter<std::fs::File>,
    n: u64,
}

impl HistoryWriter {
    /// Creates (truncates) `path`; `src` names the writer in every line.
    pub fn create(path: &Path, src: &str, clock: Clock) -> std::io::Result<Self> {
        let file = std::fs::File::create(path)?;
        Ok(HistoryWriter {
            src: src.to_string(),
            clock,
            inner: Mutex::new(WriterInner {
                file: std::io::BufWriter::new(file),
                n: 0,
            }),
        })
    }

    pub fn clock(&self) -> Clock {
        self.clock
    }

    /// Writes `event` now. Returns its timestamp.
    pub fn record(&self, event: Event) -> u64 {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        // Taken under the lock, so a file's lines are in time order.
        let t_us = self.clock.now_us();
        let record = Record {
            t_us,
            src: self.src.clone(),
            n: inner.n,
            event,
        };
        inner.n += 1;
        let line = serde_json::to_string(&record).unwrap_or_default();
        let written = writeln!(inner.file, "{line}").and_then(|()| inner.file.flush());
        if let Err(e) = written {
            tracing::error!(error = %e, "writing the history failed");
        }
        t_us
    }
}

/// Why a history could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Parse {
        path: String,
        line: usize,
        message: String,
    },
    #[error("{path}: more than EVENTS_MAX ({EVENTS_MAX}) events")]
    TooLarge { path: String },
}

/// Reads a history file. A last line without its newline (a writer killed mid-line) is skipped;
/// any other bad line is an error, as is a history over [`EVENTS_MAX`] events.
pub fn read(path: &Path) -> Result<Vec<Record>, HistoryError> {
    let shown = path.display().to_string();
    let io = |source| HistoryError::Io {
        path: shown.clone(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut reader = std::io::BufReader::new(file);
    let mut records = Vec::new();
    let mut buf = Vec::new();
    let mut line_no = 0;
    loop {
        buf.clear();
        let n = std::io::Read::take(&mut reader, LINE_BYTES_MAX as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(io)?;
        if n == 0 {
            break;
        }
        line_no += 1;
        if buf.last() != Some(&b'\n') {
            if buf.len() > LINE_BYTES_MAX {
                return Err(HistoryError::Parse {
                    path: shown,
                    line: line_no,
                    message: format!("line longer than LINE_BYTES_MAX ({LINE_BYTES_MAX})"),
                });
            }
            // A partial last line.
            break;
        }
        let text = std::str::from_utf8(&buf).map_err(|e| HistoryError::Parse {
            path: shown.clone(),
            line: line_no,
            message: e.to_string(),
        })?;
        if text.trim().is_empty() {
            continue;
        }
        let record: Record = serde_json::from_str(text).map_err(|e| HistoryError::Parse {
            path: shown.clone(),
            line: line_no,
            message: e.to_string(),
        })?;
        if records.len() >= EVENTS_MAX {
            return Err(HistoryError::TooLarge { path: shown });
        }
        records.push(record);
    }
    Ok(records)
}

/// Merges records of several writers into one timeline: by time, then writer, then line. A
/// stable order: merging the same files twice gives the same history.
pub fn merge(mut records: Vec<Record>) -> Vec<Record> {
    records.sort_by(|a, b| (a.t_us, &a.src, a.n).cmp(&(b.t_us, &b.src, b.n)));
    records
}

/// Writes records as a history file.
pub fn write_all(path: &Path, records: &[Record]) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for record in records {
        serde_json::to_writer(&mut out, record)?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.jsonl");
        let writer = HistoryWriter::create(&path, "c1", Clock::new()).unwrap();
        let from = Dev {
            user: 15550001,
            device: 1,
        };
        let msg_id = MsgId([7; 16]);
        writer.record(Event::Send {
            from,
            to_user: 15550002,
            msg_id,
            attempt: 1,
            recipients: vec![Dev {
                user: 15550002,
                device: 1,
            }],
        });
        writer.record(Event::Fault {
            id: 1,
            kind: "pause".into(),
            phase: Phase::Start,
            target: "node1".into(),
            detail: String::new(),
        });
        drop(writer);
        // A partial last line (a writer killed mid-write) is skipped.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"t_us\":1,")
            .unwrap();
        let records = read(&path).unwrap();
        assert_eq!(records.len(), 2);
        assert!(records[0].t_us <= records[1].t_us);
        assert_eq!((records[0].n, records[1].n), (0, 1));
        assert!(matches!(records[0].event, Event::Send { msg_id: m, .. } if m == msg_id));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(&"07".repeat(16)), "msg ids are hex: {text}");
        assert!(text.contains("\"type\":\"fault\""));
    }

    #[test]
    fn a_bad_line_in_the_middle_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.jsonl");
        std::fs::write(&path, "{\"nope\":1}\n\n").unwrap();
        assert!(matches!(
            read(&path),
            Err(HistoryError::Parse { line: 1, .. })
        ));
    }

    #[test]
    fn merge_orders_by_time_then_writer() {
        let rec = |t_us, src: &str, n| Record {
            t_us,
            src: src.into(),
            n,
            event: Event::Workload {
                host: src.into(),
                phase: "x".into(),
            },
        };
        let merged = merge(vec![rec(5, "b", 0), rec(3, "a", 1), rec(5, "a", 2)]);
        let order: Vec<_> = merged.iter().map(|r| (r.t_us, r.src.as_str())).collect();
        assert_eq!(order, vec![(3, "a"), (5, "a"), (5, "b")]);
    }
}
