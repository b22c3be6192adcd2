//! The checker: reads a history ([`crate::history`]) and reports every place it breaks the
//! design invariants, each violation with its msg_id and the faults around it.
//!
//! Pure: it takes records and returns a [`CheckReport`]; no IO, no clock. What it checks
//! (DESIGN.md invariant numbers after each name):
//! - **lost** (1, 2): a message with `SendAck{Ok}` that some recipient device never got. A loss
//!   of a message acked while a storage fault (disk full, fsync failure) was active is also
//!   counted as `storage_acked_lost`: such a node should have refused (`StorageUnavailable`)
//!   instead of acking.
//! - **duplicated** (2): a message handed to the application twice on one device (after the
//!   SDK's dedup).
//! - **reordered** (3): per sender device and conversation (recipient user), as seen on each
//!   recipient device, a message delivered after one that was acked later.
//! - **leaked** (4): a delivery to a device the message was not addressed to, a ciphertext
//!   written for another device or message, or a message nobody sent.
//! - **phantom** (1): a message delivered although every attempt was refused by a definitive
//!   non-`Ok` `SendAck` (which means "nothing stored").
//! - **lost**, for a `delivered` receipt (step 5 of DESIGN.md's message flow: the first device
//!   ack produces it, "neither lost nor sent twice"): a device of the recipient user acked a
//!   message (an `ack` with `ok` of the seq the message was delivered at), so the node owes the
//!   sender a `delivered` receipt, and some device of the sender user (the sending device and
//!   its other devices) never got one from that user naming the message.
//!
//! - **group messages** ([`Subject::GroupMessage`]): an acked `GroupSend` is owed to every
//!   device of every member at its group seq (the roster, below) but the sending device (lost
//!   if one never got it), handed over at most once per device (duplicated), with `group_seq`
//!   strictly increasing per group on each device, messages and changes together, and never
//!   above the one its `SendAck` gave (reordered; below it is a re-sequencing after the node's
//!   clock passed the dedup window), only to those devices and under its own group
//!   (leaked), and never after only refusals (phantom). Counted apart (`group_*` in
//!   [`Counts`]).
//! - **group changes** ([`Subject::GroupEvent`]): each group's roster is its first members,
//!   then every change at the `group_seq` the members' devices received it with. A creator's
//!   answer that disagrees with the roster at its version is a change no member device got
//!   (lost); its users, and those of an abandoned change, are then uncertain (neither owed nor
//!   leaked anything). A change made during the run is owed to every device of the members
//!   after it and of those it removed.
//!
//! There is no allowance for the end of a run, for messages or receipts: whatever was acked
//! must have arrived when the history ends. The run's settle loop
//! ([`crate::scenario::SETTLE_MAX`]) keeps the workloads running until no [`ViolationKind::Lost`]
//! of any subject is left (and nothing happened for a while), so a delivery or receipt still on
//! its way is waited for; one missing after that is a loss.
//!
//! One kind of loss is expected and not a violation: with one copy per shard a node holds the
//! only copy of its users' inboxes, so when a node is killed and then removed (`ctl remove`)
//! without coming back, what was queued there is given up. A missing message or read receipt
//! is **lost with a removed node** ([`ViolationKind::LostUnreplicated`], listed apart in
//! [`CheckReport::unreplicated`]) when all of these hold, and a plain loss otherwise:
//! - the history has the node's `kill` (recorded once the process is dead) and then its
//!   `remove` ([`crate::history::MemberAction`]), with no `ready` of it in between;
//! - its first `Ok` (`send_ack`, `receipt_ack`) was received **before the kill**: a dead node
//!   acks nothing, so an `Ok` after the kill promises a copy somewhere else (an ack in flight
//!   while the node died is in doubt, and counts as a loss);
//! - the missing device's user **lived on that node from the ack until the kill**: the last
//!   device of that user welcomed at or before the ack was welcomed by that node (so the acked
//!   copy was stored there), and every later welcome of its devices was by that node and
//!   before the kill (none elsewhere, none after: a user welcomed by another node may have had
//!   its inbox moved there).
//!
//! A missing `delivered` receipt is lost with a removed node when, by the same test of where a
//! user lived, taken from the receipt's due time (the first `ok` device ack of the message)
//! until the kill, either the acking user lived on the node (the receipt is written with the
//! ack, in that user's receipt outbox, and the ack of a device whose node is dead is never
//! processed at all) or the sender user did (the receipt waits in its inbox there, or for a
//! node that no longer exists to take it). There is no "before the kill" test here, because
//! nobody is promised anything: a receipt due after its node died is explained only if that
//! user's devices were never welcomed again, so nothing could have reached them.
//!
//! Read receipts are inbox entries routed like messages and get the same lost, duplicated and
//! leaked checks; `delivered` receipts get the lost and leaked checks (a receipt may arrive
//! twice: the node resends one whose outbox row it had not yet cleared when it crashed).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::history::{Dev, Event, MemberAction, MsgId, Phase, Record};

/// Violations listed one by one in a report; past this only the counts grow. A broken node can
/// lose every message of a run; listing a few thousand says enough.
pub const VIOLATIONS_LISTED_MAX: usize = 5_000;

/// How far before a message's first send and after its ack (or delivery) a fault counts as
/// "around" a violation, in microseconds.
pub const FAULT_CONTEXT_US: u64 = 10_000_000;

/// Fault kinds that break storage: a message acked while one is active is suspect.
pub const STORAGE_FAULT_KINDS: &[&str] = &["disk-full", "fsync-fail"];

/// What kind of violation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ViolationKind {
    Lost,
    Duplicated,
    Reordered,
    Leaked,
    Phantom,
    /// Not a violation: an acked message whose only copy lived on a node that was killed and
    /// removed (a single copy). Listed in [`CheckReport::unreplicated`].
    LostUnreplicated,
}

/// Whether a violation is about a message or a read receipt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Subject {
    Message,
    ReadReceipt,
    DeliveredReceipt,
    /// A group message (`GroupSend`); `device` is the member device concerned.
    GroupMessage,
    /// A group change (a `GroupEvent`); `msg_id` is the group's id.
    GroupEvent,
}

/// A fault window as the history tells it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultWindow {
    pub id: u32,
    pub kind: String,
    pub target: String,
    pub detail: String,
    pub start_us: u64,
    /// `None`: the history ends inside the window (it never healed).
    pub end_us: Option<u64>,
}

impl FaultWindow {
    fn overlaps(&self, lo_us: u64, hi_us: u64) -> bool {
        self.start_us <= hi_us && self.end_us.is_none_or(|end| end >= lo_us)
    }

    fn contains(&self, t_us: u64) -> bool {
        self.start_us <= t_us && self.end_us.is_none_or(|end| t_us <= end)
    }

    fn is_storage(&self) -> bool {
        STORAGE_FAULT_KINDS.contains(&self.kind.as_str())
    }
}

/// A fault named in a violation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultRef {
    pub id: u32,
    pub kind: String,
    pub target: String,
}

/// One broken invariant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    pub kind: ViolationKind,
    pub subject: Subject,
    pub msg_id: MsgId,
    /// Who sent it (for a `delivered` receipt: the device whose ack it reports).
    pub from: Dev,
    /// The device it concerns (the one that missed it, got it twice, out of order, or wrongly).
    pub device: Dev,
    pub detail: String,
    /// When it happened, or (for a loss) when the message was acked.
    pub t_us: u64,
    /// Faults whose window overlaps the message's life (see [`FAULT_CONTEXT_US`]).
    pub faults: Vec<FaultRef>,
    /// For a loss: the storage fault active when the message was acked.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub storage_fault: Option<u32>,
    /// For a loss with a removed node: that node's id.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub removed_node: Option<u64>,
}

/// A node that was killed and then removed from the cluster without coming back in between:
/// everything that lived only on it is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovedNode {
    pub node_id: u64,
    /// When it was killed (recorded once it was dead).
    pub killed_us: u64,
    /// When `ctl remove` had returned.
    pub removed_us: u64,
    /// Users whose devices were last seen on it when it was killed: their inboxes (and
    /// accounts) lived only there.
    pub users: Vec<u64>,
}

/// The numbers of a check.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Distinct messages the workload tried to send.
    pub sent: u64,
    /// Messages with `SendAck{Ok}`.
    pub acked: u64,
    /// Messages whose every answer was a definitive refusal (non-`Ok` `SendAck`).
    pub refused: u64,
    /// Messages with no `Ok` and at least one attempt without an answer (outcome unknown).
    pub unknown: u64,
    /// (acked message, recipient device) pairs the invariants require delivered.
    pub expected_deliveries: u64,
    /// Distinct (message, device) pairs handed to the application.
    pub delivered: u64,
    /// Of those, messages that never got `Ok` (allowed: the node stored it, the ack was lost).
    pub delivered_unacked: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub leaked: u64,
    pub phantom: u64,
    /// Messages acked while a storage fault was active, and how many of those were lost.
    pub storage_acked: u64,
    pub storage_acked_lost: u64,
    /// Attempts answered `StorageUnavailable` (the node refusing while its storage is broken).
    pub storage_refusals: u64,
    pub receipts_sent: u64,
    pub receipts_acked: u64,
    pub receipts_delivered: u64,
    /// `delivered` receipts the node sent (arrivals, each naming one or more messages).
    pub delivered_receipts: u64,
    /// (message, sender device) pairs owed a `delivered` receipt: a device of the recipient
    /// user acked the message.
    #[serde(default)]
    pub delivered_receipts_due: u64,
    /// Connection drops seen by the devices.
    pub disconnects: u64,
    pub faults: u64,
    /// (acked message, recipient device) pairs lost with a removed node (expected, not
    /// violations; see [`ViolationKind::LostUnreplicated`]).
    #[serde(default)]
    pub lost_unreplicated: u64,
    /// Distinct acked messages with at least one such loss.
    #[serde(default)]
    pub lost_unreplicated_messages: u64,
    /// Acked read receipts lost with a removed node (receipt, recipient device pairs).
    #[serde(default)]
    pub lost_unreplicated_receipts: u64,
    /// Due `delivered` receipts lost with a removed node (message, sender device pairs).
    #[serde(default)]
    pub lost_unreplicated_delivered_receipts: u64,
    /// Groups the workload created (the other counts above are 1:1 messages only; the
    /// violation counts cover both).
    #[serde(default)]
    pub groups: u64,
    /// Distinct group messages the workload tried to send, and those with `SendAck{Ok}`.
    #[serde(default)]
    pub group_sent: u64,
    #[serde(default)]
    pub group_acked: u64,
    /// (acked group message, member device) pairs the invariants require delivered.
    #[serde(default)]
    pub group_expected_deliveries: u64,
    /// Distinct (group message, device) pairs handed to the application.
    #[serde(default)]
    pub group_delivered: u64,
    /// Group (message or change, member device) pairs lost with a removed node (not
    /// violations).
    #[serde(default)]
    pub group_lost_unreplicated: u64,
    /// Membership changes the groups' creators were answered for during the run.
    #[serde(default)]
    pub group_changes: u64,
    /// (change, member device) pairs owed, and distinct ones handed to the application.
    #[serde(default)]
    pub group_event_expected: u64,
    #[serde(default)]
    pub group_event_deliveries: u64,
    /// Answered changes that no member device received (each also a violation).
    #[serde(default)]
    pub group_events_lost: u64,
}

/// The outcome of a check.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReport {
    pub counts: Counts,
    pub violations: Vec<Violation>,
    /// Violations found beyond [`VIOLATIONS_LISTED_MAX`] (counted, not listed).
    pub violations_unlisted: u64,
    /// Losses explained by a removed node (not violations), at most [`VIOLATIONS_LISTED_MAX`].
    #[serde(default)]
    pub unreplicated: Vec<Violation>,
    /// Nodes killed and removed without coming back.
    #[serde(default)]
    pub removed_nodes: Vec<RemovedNode>,
    pub faults: Vec<FaultWindow>,
    pub first_t_us: u64,
    pub last_t_us: u64,
}

impl CheckReport {
    /// Whether no invariant was broken.
    pub fn passed(&self) -> bool {
        self.violations.is_empty() && self.violations_unlisted == 0
    }

    /// Violations by kind.
    pub fn by_kind(&self) -> BTreeMap<ViolationKind, u64> {
        let mut map = BTreeMap::new();
        for v in &self.violations {
            *map.entry(v.kind).or_insert(0) += 1;
        }
        map
    }
}

/// `SendAck` status meaning durable.
pub const STATUS_OK: &str = "Ok";

/// `Error` code the node answers while its storage is broken.
pub const CODE_STORAGE_UNAVAILABLE: u16 = 51;

/// What the history says about one message.
#[derive(Debug)]
struct Message {
    to_user: u64,
    recipients: Vec<Dev>,
    first_send_us: u64,
    /// When the first `Ok` came and its place in the sender's ack order.
    ok: Option<(u64, u64)>,
    refusals: u32,
    /// The status of the last refusal (`UnknownUser`, ...).
    refused_as: Option<String>,
    errors: u32,
}

/// A read receipt sent by the workload.
#[derive(Debug)]
struct ReadReceipt {
    recipients: Vec<Dev>,
    msg_id: MsgId,
    sent_us: u64,
    acked_us: Option<u64>,
}

struct Checker<'a> {
    report: CheckReport,
    records: &'a [Record],
    /// Per user, the nodes that welcomed its devices, in time order: (time, node id).
    homes: HashMap<u64, Vec<(u64, u64)>>,
}

/// Checks a merged history (records in time order, as [`crate::history::merge`] gives them).
pub fn check(records: &[Record]) -> CheckReport {
    let mut checker = Checker {
        report: CheckReport::default(),
        records,
        homes: HashMap::new(),
    };
    checker.run();
    checker.report
}

impl Checker<'_> {
    fn run(&mut self) {
        let records = self.records;
        self.report.first_t_us = records.first().map_or(0, |r| r.t_us);
        self.report.last_t_us = records.iter().map(|r| r.t_us).max().unwrap_or(0);
        self.collect_faults();
        self.collect_membership();

        // Pass 1: what was sent and acked.
        let mut messages: HashMap<(Dev, MsgId), Message> = HashMap::new();
        let mut next_ack_index: HashMap<Dev, u64> = HashMap::new();
        let mut receipts: HashMap<(Dev, MsgId), ReadReceipt> = HashMap::new();
        for record in records {
            match &record.event {
                Event::Send {
                    from,
                    to_user,
                    msg_id,
                    recipients,
                    ..
                } => {
                    let message = messages.entry((*from, *msg_id)).or_insert(Message {
                        to_user: *to_user,
                        recipients: recipients.clone(),
                        first_send_us: record.t_us,
                        ok: None,
                        refusals: 0,
                        refused_as: None,
                        errors: 0,
                    });
                    if message.ok.is_none() {
                        // A retry after a refusal may carry a corrected device list.
                        message.recipients = recipients.clone();
                        message.to_user = *to_user;
                    }
                }
                Event::SendAck {
                    from,
                    msg_id,
                    status,
                    ..
                } => {
                    let Some(message) = messages.get_mut(&(*from, *msg_id)) else {
                        continue;
                    };
                    if status == STATUS_OK {
                        if message.ok.is_none() {
                            let index = next_ack_index.entry(*from).or_insert(0);
                            message.ok = Some((record.t_us, *index));
                            *index += 1;
                        }
                    } else {
                        message.refusals += 1;
                        message.refused_as = Some(status.clone());
                    }
                }
                Event::SendError {
                    from, msg_id, code, ..
                } => {
                    if let Some(message) = messages.get_mut(&(*from, *msg_id)) {
                        message.errors += 1;
                    }
                    if *code == Some(CODE_STORAGE_UNAVAILABLE) {
                        self.report.counts.storage_refusals += 1;
                    }
                }
                Event::ReceiptSend {
                    from,
                    receipt_id,
                    msg_ids,
                    recipients,
                    ..
                } => {
                    if let Some(&msg_id) = msg_ids.first() {
                        receipts.entry((*from, *receipt_id)).or_insert(ReadReceipt {
                            recipients: recipients.clone(),
                            msg_id,
                            sent_us: record.t_us,
                            acked_us: None,
                        });
                    }
                }
                Event::ReceiptAck {
                    from,
                    receipt_id,
                    status,
                } if status == STATUS_OK => {
                    if let Some(receipt) = receipts.get_mut(&(*from, *receipt_id)) {
                        receipt.acked_us.get_or_insert(record.t_us);
                    }
                }
                Event::Connection { up: false, .. } => self.report.counts.disconnects += 1,
                _ => {}
            }
        }

        let counts = &mut self.report.counts;
        counts.sent = messages.len() as u64;
        for message in messages.values() {
            match message.ok {
                Some(_) => {
                    counts.acked += 1;
                    counts.expected_deliveries += message.recipients.len() as u64;
                }
                None if message.errors == 0 && message.refusals > 0 => counts.refused += 1,
                None => counts.unknown += 1,
            }
        }
        counts.receipts_sent = receipts.len() as u64;
        counts.receipts_acked = receipts.values().filter(|r| r.acked_us.is_some()).count() as u64;

        self.check_deliveries(&messages);
        self.check_receipts(&messages, &receipts);
        self.check_losses(&messages);
        self.check_delivered_receipts(&messages);
        self.check_groups();
        self.report
            .violations
            .sort_by_key(|v| (v.t_us, v.kind, v.device, v.msg_id));
        self.report
            .unreplicated
            .sort_by_key(|v| (v.t_us, v.device, v.msg_id));
    }

    fn collect_faults(&mut self) {
        let mut open: HashMap<u32, usize> = HashMap::new();
        for record in self.records {
            let Event::Fault {
                id,
                kind,
                phase,
                target,
                detail,
            } = &record.event
            else {
                continue;
            };
            match phase {
                Phase::Start => {
                    open.insert(*id, self.report.faults.len());
                    self.report.faults.push(FaultWindow {
                        id: *id,
                        kind: kind.clone(),
                        target: target.clone(),
                        detail: detail.clone(),
                        start_us: record.t_us,
                        end_us: None,
                    });
                }
                Phase::End => {
                    if let Some(i) = open.remove(id) {
                        let window = &mut self.report.faults[i];
                        window.end_us = Some(record.t_us);
                        // The end says what was done, which the start could only plan.
                        if !detail.is_empty() {
                            window.detail = detail.clone();
                        }
                    }
                }
            }
        }
        self.report.counts.faults = self.report.faults.len() as u64;
    }

    /// Which nodes were killed and removed, and where each user's devices were welcomed.
    fn collect_membership(&mut self) {
        let mut killed: HashMap<u64, u64> = HashMap::new();
        for record in self.records {
            match &record.event {
                Event::Member {
                    node_id, action, ..
                } => match action {
                    MemberAction::Ready => {
                        killed.remove(node_id);
                    }
                    MemberAction::Kill => {
                        killed.insert(*node_id, record.t_us);
                    }
                    MemberAction::Remove => {
                        if let Some(killed_us) = killed.remove(node_id) {
                            self.report.removed_nodes.push(RemovedNode {
                                node_id: *node_id,
                                killed_us,
                                removed_us: record.t_us,
                                users: Vec::new(),
                            });
                        }
                    }
                    MemberAction::Drain
                    | MemberAction::Left
                    | MemberAction::Down
                    | MemberAction::Active => {}
                },
                Event::Connection {
                    at,
                    up: true,
                    node: Some(node),
                    ..
                } => self
                    .homes
                    .entry(at.user)
                    .or_default()
                    .push((record.t_us, *node)),
                _ => {}
            }
        }
        let mut removed = std::mem::take(&mut self.report.removed_nodes);
        for node in &mut removed {
            node.users = self
                .homes
                .keys()
                .copied()
                .filter(|&user| self.home_at(user, node.killed_us) == Some(node.node_id))
                .collect();
            node.users.sort_unstable();
        }
        self.report.removed_nodes = removed;
    }

    /// The node that most recently welcomed a device of `user` at or before `t_us`.
    fn home_at(&self, user: u64, t_us: u64) -> Option<u64> {
        let homes = self.homes.get(&user)?;
        let after = homes.partition_point(|&(t, _)| t <= t_us);
        after.checked_sub(1).map(|i| homes[i].1)
    }

    /// Whether `user`'s inbox lived on the removed node `r` from `t_us` until `r` died: the
    /// last welcome of one of its devices at or before `t_us` was by `r`, and every later one
    /// was by `r` too and came before the kill (none by another node, none after the kill).
    fn lived_on_until_killed(&self, user: u64, t_us: u64, r: &RemovedNode) -> bool {
        let Some(homes) = self.homes.get(&user) else {
            return false;
        };
        let after = homes.partition_point(|&(t, _)| t <= t_us);
        after > 0
            && homes[after - 1].1 == r.node_id
            && homes[after..]
                .iter()
                .all(|&(t, node)| node == r.node_id && t <= r.killed_us)
    }

    /// The removed node a missing copy for `device` of something first acked at `acked_us` (a
    /// message, a read receipt) is explained by, if any: the ack was received before the node
    /// was killed (a dead node acks nothing) and the device's user lived on it from the ack
    /// until the kill.
    fn removed_node_for_ack(&self, device: Dev, acked_us: u64) -> Option<u64> {
        self.report
            .removed_nodes
            .iter()
            .find(|r| {
                acked_us < r.killed_us && self.lived_on_until_killed(device.user, acked_us, r)
            })
            .map(|r| r.node_id)
    }

    /// The removed node a missing `delivered` receipt, due at `due_us`, is explained by, if
    /// any: the acking user (whose outbox it is written to with the ack) or the sender user
    /// (whose inbox it is stored in) lived on it from `due_us` until it was killed.
    fn removed_node_for_receipt(
        &self,
        acking_user: u64,
        sender_user: u64,
        due_us: u64,
    ) -> Option<u64> {
        self.report
            .removed_nodes
            .iter()
            .find(|r| {
                self.lived_on_until_killed(acking_user, due_us, r)
                    || self.lived_on_until_killed(sender_user, due_us, r)
            })
            .map(|r| r.node_id)
    }

    fn faults_around(&self, lo_us: u64, hi_us: u64) -> Vec<FaultRef> {
        let lo_us = lo_us.saturating_sub(FAULT_CONTEXT_US);
        let hi_us = hi_us.saturating_add(FAULT_CONTEXT_US);
        self.report
            .faults
            .iter()
            .filter(|f| f.overlaps(lo_us, hi_us))
            .map(|f| FaultRef {
                id: f.id,
                kind: f.kind.clone(),
                target: f.target.clone(),
            })
            .collect()
    }

    fn push(&mut self, violation: Violation) {
        match violation.kind {
            ViolationKind::Lost => self.report.counts.lost += 1,
            ViolationKind::Duplicated => self.report.counts.duplicated += 1,
            ViolationKind::Reordered => self.report.counts.reordered += 1,
            ViolationKind::Leaked => self.report.counts.leaked += 1,
            ViolationKind::Phantom => self.report.counts.phantom += 1,
            ViolationKind::LostUnreplicated => {
                let counts = &mut self.report.counts;
                match violation.subject {
                    Subject::Message => counts.lost_unreplicated += 1,
                    Subject::ReadReceipt => counts.lost_unreplicated_receipts += 1,
                    Subject::DeliveredReceipt => counts.lost_unreplicated_delivered_receipts += 1,
                    Subject::GroupMessage | Subject::GroupEvent => {
                        counts.group_lost_unreplicated += 1
                    }
                }
                if self.report.unreplicated.len() < VIOLATIONS_LISTED_MAX {
                    self.report.unreplicated.push(violation);
                }
                return;
            }
        }
        if self.report.violations.len() < VIOLATIONS_LISTED_MAX {
            self.report.violations.push(violation);
        } else {
            self.report.violations_unlisted += 1;
        }
    }

    /// A lost message or receipt: `LostUnreplicated` when `removed` names a removed node that
    /// may have held its only copy, `Lost` otherwise.
    #[allow(clippy::too_many_arguments)]
    fn lost(
        &self,
        removed: Option<u64>,
        subject: Subject,
        msg_id: MsgId,
        from: Dev,
        device: Dev,
        detail: String,
        t_us: u64,
        life: (u64, u64),
    ) -> Violation {
        let kind = match removed {
            Some(_) => ViolationKind::LostUnreplicated,
            None => ViolationKind::Lost,
        };
        let mut violation = self.violation(kind, subject, msg_id, from, device, detail, t_us, life);
        violation.removed_node = removed;
        violation
    }

    #[allow(clippy::too_many_arguments)]
    fn violation(
        &self,
        kind: ViolationKind,
        subject: Subject,
        msg_id: MsgId,
        from: Dev,
        device: Dev,
        detail: String,
        t_us: u64,
        life: (u64, u64),
    ) -> Violation {
        Violation {
            kind,
            subject,
            msg_id,
            from,
            device,
            detail,
            t_us,
            faults: self.faults_around(life.0, life.1),
            storage_fault: None,
            removed_node: None,
        }
    }

    /// Leaks, phantoms, duplicates and reorders, walking every delivery in history order.
    fn check_deliveries(&mut self, messages: &HashMap<(Dev, MsgId), Message>) {
        let records = self.records;
        let mut seen: HashSet<(Dev, Dev, MsgId)> = HashSet::new();
        let mut unacked_seen: HashSet<(Dev, MsgId)> = HashSet::new();
        // (recipient device, sender device, conversation) -> highest ack index delivered so far
        // and the message that had it.
        let mut highest: HashMap<(Dev, Dev, u64), (u64, MsgId)> = HashMap::new();
        for record in records {
            let Event::Deliver {
                at,
                msg_id,
                from,
                body,
                ..
            } = &record.event
            else {
                continue;
            };
            let (at, msg_id, from) = (*at, *msg_id, *from);
            let t_us = record.t_us;
            let message = messages.get(&(from, msg_id));
            let life = message.map_or((t_us, t_us), |m| (m.first_send_us, t_us));
            let v = |kind, detail: String| (kind, detail);
            let mut found = Vec::new();
            match message {
                None => found.push(v(
                    ViolationKind::Leaked,
                    format!("delivered to {at} but {from} never sent {msg_id}"),
                )),
                Some(m) => {
                    if !m.recipients.contains(&at) {
                        found.push(v(
                            ViolationKind::Leaked,
                            format!(
                                "delivered to {at}, which is not one of its recipients {}",
                                list(&m.recipients)
                            ),
                        ));
                    }
                    if m.ok.is_none() && m.errors == 0 && m.refusals > 0 {
                        found.push(v(
                            ViolationKind::Phantom,
                            format!(
                                "delivered to {at} although all {} attempts were refused (last: \
                                 {}, which means nothing was stored)",
                                m.refusals,
                                m.refused_as.as_deref().unwrap_or("?")
                            ),
                        ));
                    }
                }
            }
            match body {
                Some(tag) if tag.to == at && tag.msg_id == msg_id => {}
                Some(tag) => found.push(v(
                    ViolationKind::Leaked,
                    format!(
                        "{at} got the ciphertext written for {} (message {})",
                        tag.to, tag.msg_id
                    ),
                )),
                None => found.push(v(
                    ViolationKind::Leaked,
                    format!("{at} got a ciphertext the workload did not write"),
                )),
            }
            let first = seen.insert((at, from, msg_id));
            if !first {
                found.push(v(
                    ViolationKind::Duplicated,
                    format!("handed to the application on {at} again"),
                ));
            } else {
                self.report.counts.delivered += 1;
                if message.is_some_and(|m| m.ok.is_none()) && unacked_seen.insert((from, msg_id)) {
                    self.report.counts.delivered_unacked += 1;
                }
            }
            if let (true, Some(m)) = (first, message) {
                if let Some((_, index)) = m.ok {
                    let key = (at, from, m.to_user);
                    match highest.get(&key) {
                        Some(&(top, top_msg)) if top > index => found.push(v(
                            ViolationKind::Reordered,
                            format!(
                                "delivered to {at} after {top_msg}, which {from} got acked later \
                                 (ack #{index} after ack #{top} in conversation with {})",
                                m.to_user
                            ),
                        )),
                        _ => {
                            highest.insert(key, (index, msg_id));
                        }
                    }
                }
            }
            for (kind, detail) in found {
                let violation =
                    self.violation(kind, Subject::Message, msg_id, from, at, detail, t_us, life);
                self.push(violation);
            }
        }
    }

    /// Read receipts: leaked and duplicated as they arrive, then lost; `delivered` receipts
    /// for leaks (their losses: [`Self::check_delivered_receipts`]).
    fn check_receipts(
        &mut self,
        messages: &HashMap<(Dev, MsgId), Message>,
        receipts: &HashMap<(Dev, MsgId), ReadReceipt>,
    ) {
        let records = self.records;
        // (reader device, message it read) -> the receipt, for matching arrivals.
        let by_read: HashMap<(Dev, MsgId), &ReadReceipt> = receipts
            .iter()
            .map(|((from, _), r)| ((*from, r.msg_id), r))
            .collect();
        // Which (sender user, recipient user, msg_id) messages exist, for delivered receipts.
        let sent_between: HashSet<(u64, u64, MsgId)> = messages
            .iter()
            .map(|((from, msg_id), m)| (from.user, m.to_user, *msg_id))
            .collect();
        let mut seen: HashSet<(Dev, Dev, MsgId)> = HashSet::new();
        for record in records {
            let Event::Receipt {
                at,
                kind,
                by,
                msg_ids,
                ..
            } = &record.event
            else {
                continue;
            };
            let t_us = record.t_us;
            if kind == "delivered" {
                self.report.counts.delivered_receipts += 1;
                for msg_id in msg_ids {
                    if !sent_between.contains(&(at.user, by.user, *msg_id)) {
                        let violation = self.violation(
                            ViolationKind::Leaked,
                            Subject::DeliveredReceipt,
                            *msg_id,
                            *by,
                            *at,
                            format!(
                                "{at} told that {by} received {msg_id}, which user {} never \
                                 sent to user {}",
                                at.user, by.user
                            ),
                            t_us,
                            (t_us, t_us),
                        );
                        self.push(violation);
                    }
                }
                continue;
            }
            let Some(&msg_id) = msg_ids.first() else {
                continue;
            };
            let found = by_read.get(&(*by, msg_id));
            let life = found.map_or((t_us, t_us), |r| (r.sent_us, t_us));
            let mut problems = Vec::new();
            match found {
                None => problems.push((
                    ViolationKind::Leaked,
                    format!("{at} got a read receipt from {by} for {msg_id} that was never sent"),
                )),
                Some(r) if !r.recipients.contains(at) => problems.push((
                    ViolationKind::Leaked,
                    format!(
                        "{at} got a read receipt from {by} addressed to {}",
                        list(&r.recipients)
                    ),
                )),
                Some(_) => {}
            }
            if seen.insert((*at, *by, msg_id)) {
                self.report.counts.receipts_delivered += 1;
            } else {
                problems.push((
                    ViolationKind::Duplicated,
                    format!("read receipt from {by} handed to {at} again"),
                ));
            }
            for (kind, detail) in problems {
                let violation = self.violation(
                    kind,
                    Subject::ReadReceipt,
                    msg_id,
                    *by,
                    *at,
                    detail,
                    t_us,
                    life,
                );
                self.push(violation);
            }
        }

        // Lost read receipts.
        let mut missing = Vec::new();
        for ((from, _), receipt) in receipts {
            let Some(acked_us) = receipt.acked_us else {
                continue;
            };
            for device in &receipt.recipients {
                if !seen.contains(&(*device, *from, receipt.msg_id)) {
                    missing.push((*from, *device, receipt.msg_id, receipt.sent_us, acked_us));
                }
            }
        }
        missing.sort();
        for (from, device, msg_id, sent_us, acked_us) in missing {
            let removed = self.removed_node_for_ack(device, acked_us);
            let mut detail =
                format!("read receipt from {from} for {msg_id}, acked, never reached {device}");
            if let Some(node) = removed {
                detail.push_str(&lived_only_on(node));
            }
            let violation = self.lost(
                removed,
                Subject::ReadReceipt,
                msg_id,
                from,
                device,
                detail,
                acked_us,
                (sent_us, acked_us),
            );
            self.push(violation);
        }
    }

    /// `delivered` receipts owed and never received: one is due, on every device of the sender
    /// user, for each message a device of its recipient user acked (the node writes it with
    /// the first such ack it processes, so the first `ok` ack in the history is when it became
    /// due).
    fn check_delivered_receipts(&mut self, messages: &HashMap<(Dev, MsgId), Message>) {
        // What each device was last handed at each seq: a message (sender, msg_id) or a
        // receipt, so that an ack's seq names what it acked.
        let mut at_seq: HashMap<(Dev, u64), Option<(Dev, MsgId)>> = HashMap::new();
        // Message -> when a device of its recipient user first acked it, and which device.
        let mut due: HashMap<(Dev, MsgId), (u64, Dev)> = HashMap::new();
        // (device, user whose ack it reports, msg_id) of every `delivered` receipt that arrived.
        let mut arrived: HashSet<(Dev, u64, MsgId)> = HashSet::new();
        for record in self.records {
            match &record.event {
                Event::Deliver {
                    at,
                    seq,
                    msg_id,
                    from,
                    ..
                } => {
                    at_seq.insert((*at, *seq), Some((*from, *msg_id)));
                }
                Event::Receipt {
                    at,
                    kind,
                    by,
                    msg_ids,
                    seq,
                } => {
                    at_seq.insert((*at, *seq), None);
                    if kind == "delivered" {
                        arrived.extend(msg_ids.iter().map(|id| (*at, by.user, *id)));
                    }
                }
                Event::Ack { at, seqs, ok: true } => {
                    for seq in seqs {
                        let Some(Some((from, msg_id))) = at_seq.get(&(*at, *seq)) else {
                            continue;
                        };
                        let Some(m) = messages.get(&(*from, *msg_id)) else {
                            continue;
                        };
                        // The node owes a receipt for another user's message only.
                        if at.user == m.to_user && from.user != at.user && m.recipients.contains(at)
                        {
                            due.entry((*from, *msg_id)).or_insert((record.t_us, *at));
                        }
                    }
                }
                _ => {}
            }
        }
        let mut missing = Vec::new();
        for (&(from, msg_id), &(due_us, by)) in &due {
            let Some(m) = messages.get(&(from, msg_id)) else {
                continue;
            };
            // Every device of the sender user: the sending one and the others it wrote for.
            let mut senders: Vec<Dev> = m
                .recipients
                .iter()
                .copied()
                .filter(|d| d.user == from.user)
                .chain([from])
                .collect();
            senders.sort_unstable();
            senders.dedup();
            self.report.counts.delivered_receipts_due += senders.len() as u64;
            for device in senders {
                if !arrived.contains(&(device, m.to_user, msg_id)) {
                    missing.push((due_us, device, from, msg_id, by, m.first_send_us));
                }
            }
        }
        missing.sort();
        for (due_us, device, from, msg_id, by, sent_us) in missing {
            let removed = self.removed_node_for_receipt(by.user, from.user, due_us);
            let mut detail = format!(
                "{by} acked {msg_id} from {from}, but its delivered receipt never reached {device}"
            );
            if let Some(node) = removed {
                detail.push_str(&format!(
                    "; it lived only on node {node} (with the ack, or in {device}'s inbox), \
                     which was killed and removed (a single copy): lost with a removed \
                     node, not a violation"
                ));
            }
            let violation = self.lost(
                removed,
                Subject::DeliveredReceipt,
                msg_id,
                by,
                device,
                detail,
                due_us,
                (sent_us, due_us),
            );
            self.push(violation);
        }
    }

    /// Acked messages some recipient device never got.
    fn check_losses(&mut self, messages: &HashMap<(Dev, MsgId), Message>) {
        let mut delivered: HashSet<(Dev, Dev, MsgId)> = HashSet::new();
        for record in self.records {
            if let Event::Deliver {
                at, msg_id, from, ..
            } = &record.event
            {
                delivered.insert((*at, *from, *msg_id));
            }
        }
        let mut storage_acked = 0;
        let mut lost = Vec::new();
        for ((from, msg_id), message) in messages {
            let Some((acked_us, index)) = message.ok else {
                continue;
            };
            let storage_fault = self
                .report
                .faults
                .iter()
                .find(|f| f.is_storage() && f.contains(acked_us))
                .map(|f| f.id);
            if storage_fault.is_some() {
                storage_acked += 1;
            }
            for device in &message.recipients {
                if !delivered.contains(&(*device, *from, *msg_id)) {
                    lost.push((
                        acked_us,
                        *device,
                        *from,
                        *msg_id,
                        index,
                        message.first_send_us,
                        storage_fault,
                    ));
                }
            }
        }
        self.report.counts.storage_acked = storage_acked;
        lost.sort();
        let mut storage_lost: HashSet<(Dev, MsgId)> = HashSet::new();
        let mut unreplicated_lost: HashSet<(Dev, MsgId)> = HashSet::new();
        for (acked_us, device, from, msg_id, index, sent_us, storage_fault) in lost {
            let mut detail = format!("acked (ack #{index} of {from}), never reached {device}");
            let removed = self.removed_node_for_ack(device, acked_us);
            if let Some(node) = removed {
                detail.push_str(&lived_only_on(node));
                unreplicated_lost.insert((from, msg_id));
            } else if let Some(id) = storage_fault {
                detail.push_str(&format!(
                    "; acked during storage fault {id}: the node should have refused instead"
                ));
                storage_lost.insert((from, msg_id));
            }
            let mut violation = self.lost(
                removed,
                Subject::Message,
                msg_id,
                from,
                device,
                detail,
                acked_us,
                (sent_us, acked_us),
            );
            violation.storage_fault = storage_fault;
            self.push(violation);
        }
        self.report.counts.storage_acked_lost = storage_lost.len() as u64;
        self.report.counts.lost_unreplicated_messages = unreplicated_lost.len() as u64;
    }
}

/// What the history says about one group message.
#[derive(Debug)]
struct GroupMessage {
    group: MsgId,
    /// The recipients the sender computed from the group's first members (used when the
    /// group's roster is unknown).
    recipients: Vec<Dev>,
    first_send_us: u64,
    ok_us: Option<u64>,
    /// Its group seq, from the `SendAck` (0 if it did not say).
    acked_seq: u64,
    refusals: u32,
    refused_as: Option<String>,
    errors: u32,
}

/// One group's membership over its group sequence, as the history tells it: its first
/// members, then each change as its members' devices received it (`GroupEventDeliver`),
/// checked against the creator's answers (`GroupChanged`).
#[derive(Debug, Default)]
struct Roster {
    creator: Option<Dev>,
    initial: BTreeSet<u64>,
    /// Group seq -> (added, removed), as first delivered.
    changes: BTreeMap<u64, (Vec<u64>, Vec<u64>)>,
    /// Users whose membership the history cannot tell at every seq (a change of theirs was
    /// abandoned unanswered, or delivered changes disagree with an answer): neither owed
    /// nor leaked anything.
    uncertain: BTreeSet<u64>,
}

impl Roster {
    /// The members a record at group seq `seq` goes to: the first members after every change
    /// sequenced before it.
    fn members_at(&self, seq: u64) -> BTreeSet<u64> {
        let mut members = self.initial.clone();
        for (added, removed) in self.changes.range(..seq).map(|(_, c)| c) {
            members.extend(added.iter().copied());
            for u in removed {
                members.remove(u);
            }
        }
        members
    }
}

impl Checker<'_> {
    /// Every user's devices: those taking part (`device`), and those group senders listed as
    /// recipients (every device of every first member).
    fn devices_by_user(&self) -> BTreeMap<u64, Vec<Dev>> {
        let mut out: BTreeMap<u64, Vec<Dev>> = BTreeMap::new();
        for record in self.records {
            match &record.event {
                Event::Device { dev, .. } => out.entry(dev.user).or_default().push(*dev),
                Event::GroupSend {
                    from, recipients, ..
                } => {
                    for d in recipients.iter().chain([from]) {
                        out.entry(d.user).or_default().push(*d);
                    }
                }
                _ => {}
            }
        }
        for list in out.values_mut() {
            list.sort_unstable();
            list.dedup();
        }
        out
    }

    /// Each group's roster. A change the creator was answered for that no member device
    /// received is a lost group event (every member, the creator's own devices included, is
    /// owed it); the users it touched become uncertain.
    fn group_rosters(&mut self) -> HashMap<MsgId, Roster> {
        let records = self.records;
        let mut rosters: HashMap<MsgId, Roster> = HashMap::new();
        // (time, creator device, group, version, members) of each answered change.
        let mut answers = Vec::new();
        for record in records {
            match &record.event {
                Event::Group {
                    group,
                    members,
                    creator,
                } => {
                    let r = rosters.entry(*group).or_default();
                    r.creator = Some(*creator);
                    r.initial = members.iter().copied().collect();
                }
                Event::GroupEventDeliver {
                    at,
                    group,
                    group_seq,
                    added,
                    removed,
                    ..
                } => {
                    let r = rosters.entry(*group).or_default();
                    let change = (added.clone(), removed.clone());
                    match r.changes.get(group_seq) {
                        None => {
                            r.changes.insert(*group_seq, change);
                        }
                        Some(first) if *first == change => {}
                        Some(first) => {
                            let detail = format!(
                                "{at} got change {group_seq} of group {group} as +{:?} -{:?}, \
                                 another device as +{:?} -{:?}",
                                change.0, change.1, first.0, first.1
                            );
                            let v = self.violation(
                                ViolationKind::Leaked,
                                Subject::GroupEvent,
                                *group,
                                *at,
                                *at,
                                detail,
                                record.t_us,
                                (record.t_us, record.t_us),
                            );
                            self.push(v);
                        }
                    }
                }
                Event::GroupChanged {
                    by,
                    group,
                    version,
                    members,
                    ..
                } => answers.push((record.t_us, *by, *group, *version, members.clone())),
                Event::GroupChangeAbandoned {
                    group, add, remove, ..
                } => {
                    let r = rosters.entry(*group).or_default();
                    r.uncertain.extend(add.iter().chain(remove).copied());
                }
                _ => {}
            }
        }
        for (t_us, by, group, version, members) in answers {
            let Some(roster) = rosters.get_mut(&group) else {
                continue;
            };
            let answered: BTreeSet<u64> = members.iter().copied().collect();
            let known = roster.members_at(version + 1);
            if known == answered {
                continue;
            }
            let differ: Vec<u64> = known.symmetric_difference(&answered).copied().collect();
            roster.uncertain.extend(differ.iter().copied());
            self.report.counts.group_events_lost += 1;
            let detail = format!(
                "group {group}: the creator was answered {:?} at version {version}, but the \
                 changes its members' devices received give {:?} (a change of {differ:?} never \
                 reached a member device)",
                answered, known
            );
            let removed = self
                .report
                .removed_nodes
                .iter()
                .find(|r| t_us < r.killed_us)
                .map(|r| r.node_id);
            let v = self.lost(
                removed,
                Subject::GroupEvent,
                group,
                by,
                by,
                detail,
                t_us,
                (t_us, t_us),
            );
            self.push(v);
        }
        rosters
    }

    /// Group messages and changes: leaked, phantom, duplicated and reordered as they arrive
    /// (reordered: a member device handed a group's records out of `group_seq` order), then
    /// lost (an acked message some member device at its group seq, other than the sending
    /// one, never got; a change some device of a member after it, or of a member it removed,
    /// never got).
    fn check_groups(&mut self) {
        let records = self.records;
        let rosters = self.group_rosters();
        let devices = self.devices_by_user();
        let devices_of = |users: &BTreeSet<u64>, uncertain: &BTreeSet<u64>| -> Vec<Dev> {
            users
                .iter()
                .filter(|u| !uncertain.contains(u))
                .flat_map(|u| devices.get(u).into_iter().flatten().copied())
                .collect()
        };
        let mut messages: HashMap<(Dev, MsgId), GroupMessage> = HashMap::new();
        for record in records {
            match &record.event {
                Event::Group { .. } => self.report.counts.groups += 1,
                Event::GroupChanged { .. } => self.report.counts.group_changes += 1,
                Event::GroupSend {
                    from,
                    group,
                    msg_id,
                    recipients,
                    ..
                } => {
                    let m = messages.entry((*from, *msg_id)).or_insert(GroupMessage {
                        group: *group,
                        recipients: recipients.clone(),
                        first_send_us: record.t_us,
                        ok_us: None,
                        acked_seq: 0,
                        refusals: 0,
                        refused_as: None,
                        errors: 0,
                    });
                    if m.ok_us.is_none() {
                        m.recipients = recipients.clone();
                    }
                }
                Event::SendAck {
                    from,
                    msg_id,
                    status,
                    group_seq,
                    ..
                } => {
                    if let Some(m) = messages.get_mut(&(*from, *msg_id)) {
                        if status == STATUS_OK {
                            m.ok_us.get_or_insert(record.t_us);
                            if m.acked_seq == 0 {
                                m.acked_seq = *group_seq;
                            }
                        } else {
                            m.refusals += 1;
                            m.refused_as = Some(status.clone());
                        }
                    }
                }
                Event::SendError { from, msg_id, .. } => {
                    if let Some(m) = messages.get_mut(&(*from, *msg_id)) {
                        m.errors += 1;
                    }
                }
                _ => {}
            }
        }

        // Arrivals, in history order.
        let mut seen: HashSet<(Dev, Dev, MsgId)> = HashSet::new();
        // (device, group, group seq) of changes handed over.
        let mut seen_changes: HashSet<(Dev, MsgId, u64)> = HashSet::new();
        // The group seq of each message, as first delivered (for messages acked without one).
        let mut delivered_seq: HashMap<(Dev, MsgId), u64> = HashMap::new();
        // (member device, group) -> highest group_seq handed over so far, and what it was.
        let mut highest: HashMap<(Dev, MsgId), (u64, String)> = HashMap::new();
        for record in records {
            let t_us = record.t_us;
            match &record.event {
                Event::GroupEventDeliver {
                    at,
                    group,
                    group_seq,
                    actor,
                    ..
                } => {
                    let at = *at;
                    if !seen_changes.insert((at, *group, *group_seq)) {
                        let v = self.violation(
                            ViolationKind::Duplicated,
                            Subject::GroupEvent,
                            *group,
                            at,
                            at,
                            format!("change {group_seq} of group {group} handed to {at} again"),
                            t_us,
                            (t_us, t_us),
                        );
                        self.push(v);
                        continue;
                    }
                    if *group_seq >= 2 {
                        // The creation (seq 1) is not counted: it may come before the history.
                        self.report.counts.group_event_deliveries += 1;
                    }
                    let what = format!("change by {actor}");
                    if let Some(detail) = out_of_order(&mut highest, at, *group, *group_seq, what) {
                        let v = self.violation(
                            ViolationKind::Reordered,
                            Subject::GroupEvent,
                            *group,
                            at,
                            at,
                            detail,
                            t_us,
                            (t_us, t_us),
                        );
                        self.push(v);
                    }
                }
                Event::GroupDeliver {
                    at,
                    group,
                    group_seq,
                    msg_id,
                    from,
                    body,
                    ..
                } => {
                    let (at, msg_id, from) = (*at, *msg_id, *from);
                    let message = messages.get(&(from, msg_id));
                    let life = message.map_or((t_us, t_us), |m| (m.first_send_us, t_us));
                    let roster = rosters.get(group);
                    let mut found = Vec::new();
                    match message {
                        None => found.push((
                            ViolationKind::Leaked,
                            format!(
                                "group message delivered to {at} but {from} never sent {msg_id}"
                            ),
                        )),
                        Some(m) => {
                            if m.group != *group {
                                found.push((
                                    ViolationKind::Leaked,
                                    format!(
                                        "delivered to {at} as one of group {group}, sent to {}",
                                        m.group
                                    ),
                                ));
                            }
                            match roster {
                                Some(r) if !r.uncertain.contains(&at.user) => {
                                    let members = r.members_at(*group_seq);
                                    if at == from || !members.contains(&at.user) {
                                        found.push((
                                            ViolationKind::Leaked,
                                            format!(
                                                "group message (seq {group_seq}) delivered to \
                                                 {at}, whose user was not a member at that \
                                                 seq (members {members:?})"
                                            ),
                                        ));
                                    }
                                }
                                Some(_) => {}
                                None => {
                                    if !m.recipients.contains(&at) {
                                        found.push((
                                            ViolationKind::Leaked,
                                            format!(
                                                "group message delivered to {at}, which is not \
                                                 one of its recipients {}",
                                                list(&m.recipients)
                                            ),
                                        ));
                                    }
                                }
                            }
                            // Delivered at an earlier seq than acked: an attempt was sequenced,
                            // its answer lost, and a retry sequenced again once the node's clock
                            // had passed the dedup window (the clock faults move it days); the
                            // device keeps the first copy. A later seq than acked means the
                            // acked copy never reached the device first.
                            if m.acked_seq != 0 && *group_seq > m.acked_seq {
                                found.push((
                                    ViolationKind::Reordered,
                                    format!(
                                        "delivered to {at} at group seq {group_seq}, acked to \
                                         the sender at {}",
                                        m.acked_seq
                                    ),
                                ));
                            }
                            if m.ok_us.is_none() && m.errors == 0 && m.refusals > 0 {
                                found.push((
                                    ViolationKind::Phantom,
                                    format!(
                                        "group message delivered to {at} although all {} \
                                         attempts were refused (last: {})",
                                        m.refusals,
                                        m.refused_as.as_deref().unwrap_or("?")
                                    ),
                                ));
                            }
                        }
                    }
                    match body {
                        Some(tag) if tag.group == *group && tag.msg_id == msg_id => {}
                        Some(tag) => found.push((
                            ViolationKind::Leaked,
                            format!(
                                "{at} got the ciphertext of group {} message {} as {msg_id} of \
                                 group {group}",
                                tag.group, tag.msg_id
                            ),
                        )),
                        None => found.push((
                            ViolationKind::Leaked,
                            format!("{at} got a group ciphertext the workload did not write"),
                        )),
                    }
                    if seen.insert((at, from, msg_id)) {
                        self.report.counts.group_delivered += 1;
                        delivered_seq.entry((from, msg_id)).or_insert(*group_seq);
                        let what = format!("{msg_id}");
                        if let Some(detail) =
                            out_of_order(&mut highest, at, *group, *group_seq, what)
                        {
                            found.push((ViolationKind::Reordered, detail));
                        }
                    } else {
                        found.push((
                            ViolationKind::Duplicated,
                            format!("group message handed to the application on {at} again"),
                        ));
                    }
                    for (kind, detail) in found {
                        let v = self.violation(
                            kind,
                            Subject::GroupMessage,
                            msg_id,
                            from,
                            at,
                            detail,
                            t_us,
                            life,
                        );
                        self.push(v);
                    }
                }
                _ => {}
            }
        }

        // Who was owed each acked message: every device of the members at its group seq
        // (from its SendAck, else from a delivery) but the sending one; the first members'
        // when the roster or the seq is unknown.
        let mut lost = Vec::new();
        let counts_groups = messages.len() as u64;
        let mut acked = 0;
        let mut expected = 0;
        for ((from, msg_id), m) in &messages {
            let Some(acked_us) = m.ok_us else {
                continue;
            };
            acked += 1;
            let seq = match m.acked_seq {
                0 => delivered_seq.get(&(*from, *msg_id)).copied(),
                s => Some(s),
            };
            let owed: Vec<Dev> = match (rosters.get(&m.group), seq) {
                (Some(r), Some(seq)) => devices_of(&r.members_at(seq), &r.uncertain)
                    .into_iter()
                    .filter(|d| d != from)
                    .collect(),
                _ => m.recipients.clone(),
            };
            expected += owed.len() as u64;
            for device in owed {
                if !seen.contains(&(device, *from, *msg_id)) {
                    lost.push((acked_us, device, *from, *msg_id, m.group, m.first_send_us));
                }
            }
        }
        let counts = &mut self.report.counts;
        counts.group_sent = counts_groups;
        counts.group_acked = acked;
        counts.group_expected_deliveries = expected;
        lost.sort();
        for (acked_us, device, from, msg_id, group, sent_us) in lost {
            let mut detail = format!("group {group} message acked, never reached {device}");
            // The member's inbox lived only on a removed node, or the group's fan-out log may
            // have (the history does not say which node owns a group): any node killed after
            // the ack and removed may have held the only copy.
            // Or the member's account went with a removed node (it lived there at the kill and
            // none of its devices was welcomed again): nothing can reach it any more.
            let removed = self.removed_for_group(device, acked_us);
            if let Some(node) = removed {
                detail.push_str(&format!(
                    "; node {node}, killed after the ack and removed, may have held its only \
                     copy (the member's inbox or the group's fan-out log): lost with a removed \
                     node, not a violation"
                ));
            }
            let v = self.lost(
                removed,
                Subject::GroupMessage,
                msg_id,
                from,
                device,
                detail,
                acked_us,
                (sent_us, acked_us),
            );
            self.push(v);
        }

        // Changes made during the run (the creation, seq 1, may have been handed over before
        // the history began): owed to every device of the members after it and of those it
        // removed.
        let mut lost_changes = Vec::new();
        for (group, roster) in &rosters {
            let Some(creator) = roster.creator else {
                continue;
            };
            for (&seq, (_, removed)) in roster.changes.range(2..) {
                let mut users = roster.members_at(seq + 1);
                users.extend(removed.iter().copied());
                for device in devices_of(&users, &roster.uncertain) {
                    self.report.counts.group_event_expected += 1;
                    if !seen_changes.contains(&(device, *group, seq)) {
                        lost_changes.push((*group, seq, device, creator));
                    }
                }
            }
        }
        lost_changes.sort();
        for (group, seq, device, creator) in lost_changes {
            // When it was made is not in the history (only when it arrived): any removed node
            // may have held it.
            let removed = self.removed_for_group(device, 0);
            let detail = format!("change {seq} of group {group} never reached {device}");
            let t_us = self.report.last_t_us;
            let v = self.lost(
                removed,
                Subject::GroupEvent,
                group,
                creator,
                device,
                detail,
                t_us,
                (t_us, t_us),
            );
            self.push(v);
        }
    }

    /// The removed node a group record owed to `device` and acked at `acked_us` may have
    /// been lost with, if any (see the loss loop of [`Checker::check_groups`]).
    fn removed_for_group(&self, device: Dev, acked_us: u64) -> Option<u64> {
        self.removed_node_for_ack(device, acked_us)
            .or_else(|| {
                self.report
                    .removed_nodes
                    .iter()
                    .find(|r| acked_us < r.killed_us)
                    .map(|r| r.node_id)
            })
            .or_else(|| {
                self.report
                    .removed_nodes
                    .iter()
                    .find(|r| {
                        r.users.contains(&device.user)
                            && self
                                .homes
                                .get(&device.user)
                                .is_none_or(|homes| homes.iter().all(|&(t, _)| t <= r.killed_us))
                    })
                    .map(|r| r.node_id)
            })
    }
}

/// Records that `at` got `group`'s record at `seq` (`what`), first time; the detail of a
/// reordering if it already got a later or equal one.
fn out_of_order(
    highest: &mut HashMap<(Dev, MsgId), (u64, String)>,
    at: Dev,
    group: MsgId,
    seq: u64,
    what: String,
) -> Option<String> {
    match highest.get(&(at, group)) {
        Some((top, top_what)) if *top >= seq => Some(format!(
            "group {group} seq {seq} ({what}) delivered to {at} after seq {top} ({top_what})"
        )),
        _ => {
            highest.insert((at, group), (seq, what));
            None
        }
    }
}

fn lived_only_on(node: u64) -> String {
    format!(
        "; its only copy lived on node {node}, which was killed and removed (no other \
         copy): lost with a removed node, not a violation"
    )
}

fn list(devs: &[Dev]) -> String {
    let names: Vec<String> = devs.iter().map(Dev::to_string).collect();
    format!("[{}]", names.join(", "))
}

#[cfg(test)]
#[path = "check/tests.rs"]
mod tests;
