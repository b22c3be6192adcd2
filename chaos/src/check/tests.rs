//! The checker's own tests: hand-built histories with one planted violation each, and a
//! property test that generates valid histories (which must pass) and then plants a loss, a
//! duplicate, a reorder and a leak into them (each of which must be found, by msg_id).

use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::history::{BodyTag, Event, MemberAction, Phase, Record};

const A1: Dev = Dev {
    user: 15550001,
    device: 1,
};
const A2: Dev = Dev {
    user: 15550001,
    device: 2,
};
const B1: Dev = Dev {
    user: 15550002,
    device: 1,
};
const C1: Dev = Dev {
    user: 15550003,
    device: 1,
};

fn id(n: u8) -> MsgId {
    MsgId([n; 16])
}

/// Builds a history one event at a time, 1 ms apart.
#[derive(Default)]
struct Builder {
    records: Vec<Record>,
    seqs: HashMap<Dev, u64>,
}

impl Builder {
    fn push(&mut self, event: Event) -> &mut Self {
        let n = self.records.len() as u64;
        self.records.push(Record {
            t_us: 1_000_000 + n * 1_000,
            src: "test".into(),
            n,
            event,
        });
        self
    }

    fn send(&mut self, from: Dev, to: &[Dev], msg: u8, status: &str) -> &mut Self {
        self.push(Event::Send {
            from,
            to_user: to[0].user,
            msg_id: id(msg),
            attempt: 1,
            recipients: to.to_vec(),
        });
        self.push(Event::SendAck {
            from,
            msg_id: id(msg),
            attempt: 1,
            status: status.into(),
            server_time_ms: 0,
            group_seq: 0,
        })
    }

    fn deliver(&mut self, at: Dev, from: Dev, msg: u8) -> &mut Self {
        self.deliver_body(
            at,
            from,
            msg,
            Some(BodyTag {
                to: at,
                msg_id: id(msg),
            }),
        )
    }

    fn deliver_body(&mut self, at: Dev, from: Dev, msg: u8, body: Option<BodyTag>) -> &mut Self {
        let seq = self.seqs.entry(at).or_insert(0);
        *seq += 1;
        let seq = *seq;
        self.push(Event::Deliver {
            at,
            seq,
            msg_id: id(msg),
            from,
            body,
        })
    }

    fn fault(&mut self, fault: u32, kind: &str, phase: Phase) -> &mut Self {
        self.push(Event::Fault {
            id: fault,
            kind: kind.into(),
            phase,
            target: "node1".into(),
            detail: String::new(),
        })
    }

    fn check(&self) -> CheckReport {
        check(&self.records)
    }
}

fn kinds(report: &CheckReport) -> Vec<(ViolationKind, MsgId)> {
    report
        .violations
        .iter()
        .map(|v| (v.kind, v.msg_id))
        .collect()
}

#[test]
fn a_clean_history_passes() {
    let mut h = Builder::default();
    h.send(A1, &[B1, A2], 1, "Ok")
        .send(A1, &[B1, A2], 2, "Ok")
        .send(B1, &[A1, A2], 3, "Ok")
        .deliver(B1, A1, 1)
        .deliver(A2, A1, 1)
        .deliver(A1, B1, 3)
        .deliver(B1, A1, 2)
        .deliver(A2, B1, 3)
        .deliver(A2, A1, 2);
    let report = h.check();
    assert!(report.passed(), "{:#?}", report.violations);
    assert_eq!(report.counts.acked, 3);
    assert_eq!(report.counts.expected_deliveries, 6);
    assert_eq!(report.counts.delivered, 6);
}

#[test]
fn a_planted_loss_is_found_with_the_faults_around_it() {
    let mut h = Builder::default();
    h.send(A1, &[B1, A2], 1, "Ok")
        .fault(7, "kill-restart", Phase::Start)
        .fault(7, "kill-restart", Phase::End)
        .deliver(A2, A1, 1);
    let report = h.check();
    assert_eq!(kinds(&report), vec![(ViolationKind::Lost, id(1))]);
    let v = &report.violations[0];
    assert_eq!(v.device, B1);
    assert_eq!(v.faults.len(), 1);
    assert_eq!(v.faults[0].kind, "kill-restart");
    assert_eq!(report.counts.lost, 1);
    assert_eq!(report.counts.storage_acked_lost, 0);
}

#[test]
fn a_planted_duplicate_is_found() {
    let mut h = Builder::default();
    h.send(A1, &[B1], 1, "Ok")
        .deliver(B1, A1, 1)
        .deliver(B1, A1, 1);
    let report = h.check();
    assert_eq!(kinds(&report), vec![(ViolationKind::Duplicated, id(1))]);
    assert_eq!(report.counts.delivered, 1);
}

#[test]
fn a_planted_reorder_is_found() {
    let mut h = Builder::default();
    h.send(A1, &[B1], 1, "Ok")
        .send(A1, &[B1], 2, "Ok")
        .send(A1, &[B1], 3, "Ok")
        .deliver(B1, A1, 2)
        .deliver(B1, A1, 1)
        .deliver(B1, A1, 3);
    let report = h.check();
    assert_eq!(kinds(&report), vec![(ViolationKind::Reordered, id(1))]);
}

#[test]
fn order_is_per_sender_device_and_conversation() {
    // A1's messages to B and to C are different conversations; A1 and A2 different senders.
    let mut h = Builder::default();
    h.send(A1, &[B1], 1, "Ok")
        .send(A1, &[C1], 2, "Ok")
        .send(A2, &[B1], 3, "Ok")
        .send(A1, &[B1], 4, "Ok")
        .deliver(C1, A1, 2)
        .deliver(B1, A2, 3)
        .deliver(B1, A1, 1)
        .deliver(B1, A1, 4);
    assert!(h.check().passed());
}

#[test]
fn planted_leaks_are_found() {
    // To a device that is not a recipient.
    let mut h = Builder::default();
    h.send(A1, &[B1], 1, "Ok")
        .deliver(B1, A1, 1)
        .deliver(C1, A1, 1);
    let report = h.check();
    assert_eq!(kinds(&report), vec![(ViolationKind::Leaked, id(1))]);
    assert_eq!(report.violations[0].device, C1);

    // Another device's ciphertext.
    let mut h = Builder::default();
    h.send(A1, &[B1, A2], 1, "Ok")
        .deliver(A2, A1, 1)
        .deliver_body(
            B1,
            A1,
            1,
            Some(BodyTag {
                to: A2,
                msg_id: id(1),
            }),
        );
    assert_eq!(kinds(&h.check()), vec![(ViolationKind::Leaked, id(1))]);

    // A message nobody sent.
    let mut h = Builder::default();
    h.deliver(B1, A1, 9);
    assert_eq!(kinds(&h.check()), vec![(ViolationKind::Leaked, id(9))]);
}

#[test]
fn a_refused_message_that_arrives_is_a_phantom_but_an_unknown_one_is_fine() {
    let mut h = Builder::default();
    h.send(A1, &[B1], 1, "InboxFull").deliver(B1, A1, 1);
    let report = h.check();
    assert_eq!(kinds(&report), vec![(ViolationKind::Phantom, id(1))]);
    assert_eq!(report.counts.refused, 1);

    let mut h = Builder::default();
    h.push(Event::Send {
        from: A1,
        to_user: B1.user,
        msg_id: id(2),
        attempt: 1,
        recipients: vec![B1],
    })
    .push(Event::SendError {
        from: A1,
        msg_id: id(2),
        attempt: 1,
        error: "disconnected".into(),
        code: None,
    })
    .deliver(B1, A1, 2);
    let report = h.check();
    assert!(report.passed(), "{:#?}", report.violations);
    assert_eq!(report.counts.unknown, 1);
    assert_eq!(report.counts.delivered_unacked, 1);
}

#[test]
fn an_ack_during_a_storage_fault_that_is_lost_is_called_out() {
    let mut h = Builder::default();
    h.fault(3, "disk-full", Phase::Start)
        .push(Event::Send {
            from: A1,
            to_user: B1.user,
            msg_id: id(1),
            attempt: 1,
            recipients: vec![B1],
        })
        .push(Event::SendError {
            from: A1,
            msg_id: id(1),
            attempt: 1,
            error: "StorageUnavailable".into(),
            code: Some(CODE_STORAGE_UNAVAILABLE),
        })
        .send(A1, &[B1], 2, "Ok")
        .fault(3, "disk-full", Phase::End);
    let report = h.check();
    assert_eq!(kinds(&report), vec![(ViolationKind::Lost, id(2))]);
    assert_eq!(report.violations[0].storage_fault, Some(3));
    assert_eq!(report.counts.storage_acked, 1);
    assert_eq!(report.counts.storage_acked_lost, 1);
    assert_eq!(report.counts.storage_refusals, 1);
}

#[test]
fn read_receipts_are_checked_like_messages() {
    let receipt = |h: &mut Builder, acked: bool| {
        h.push(Event::ReceiptSend {
            from: B1,
            to_user: A1.user,
            receipt_id: id(50),
            msg_ids: vec![id(1)],
            recipients: vec![A1, A2],
        });
        if acked {
            h.push(Event::ReceiptAck {
                from: B1,
                receipt_id: id(50),
                status: "Ok".into(),
            });
        }
    };
    let arrive = |h: &mut Builder, at: Dev| {
        h.push(Event::Receipt {
            at,
            kind: "read".into(),
            by: B1,
            msg_ids: vec![id(1)],
            seq: 9,
        });
    };
    let mut h = Builder::default();
    h.send(A1, &[B1, A2], 1, "Ok")
        .deliver(B1, A1, 1)
        .deliver(A2, A1, 1);
    receipt(&mut h, true);
    arrive(&mut h, A1);
    let report = h.check();
    assert_eq!(kinds(&report), vec![(ViolationKind::Lost, id(1))]);
    assert_eq!(report.violations[0].subject, Subject::ReadReceipt);
    assert_eq!(report.violations[0].device, A2);
    arrive(&mut h, A2);
    assert!(h.check().passed());
    arrive(&mut h, C1);
    assert_eq!(kinds(&h.check()), vec![(ViolationKind::Leaked, id(1))]);

    // A delivered receipt about a message A never sent to B.
    let mut h = Builder::default();
    h.push(Event::Receipt {
        at: A1,
        kind: "delivered".into(),
        by: B1,
        msg_ids: vec![id(4)],
        seq: 1,
    });
    assert_eq!(kinds(&h.check()), vec![(ViolationKind::Leaked, id(4))]);
}

/// Builder steps for membership: where a device was welcomed, and node lifecycle events.
impl Builder {
    fn welcomed(&mut self, at: Dev, node: u64) -> &mut Self {
        self.push(Event::Connection {
            at,
            up: true,
            reason: "connect".into(),
            node: Some(node),
        })
    }

    fn member(&mut self, node_id: u64, action: MemberAction) -> &mut Self {
        self.push(Event::Member {
            node_id,
            action,
            detail: String::new(),
        })
    }
}

#[test]
fn a_loss_with_a_killed_and_removed_node_is_explained_not_a_violation() {
    // B lives on node 3; A on node 1. Message 1 is acked (stored on node 3 for B1), then node 3
    // dies and is removed before B1 got it. Message 2 went to A2 on node 1 and arrived.
    let mut h = Builder::default();
    h.welcomed(A1, 1)
        .welcomed(A2, 1)
        .welcomed(B1, 3)
        .send(A1, &[B1, A2], 1, "Ok")
        .deliver(A2, A1, 1)
        .member(3, MemberAction::Kill)
        .member(3, MemberAction::Down)
        .member(3, MemberAction::Remove);
    let report = h.check();
    assert!(report.passed(), "{:#?}", report.violations);
    assert_eq!(report.counts.lost, 0);
    assert_eq!(report.counts.lost_unreplicated, 1);
    assert_eq!(report.counts.lost_unreplicated_messages, 1);
    assert_eq!(report.unreplicated.len(), 1);
    let v = &report.unreplicated[0];
    assert_eq!(
        (v.kind, v.device, v.removed_node),
        (ViolationKind::LostUnreplicated, B1, Some(3))
    );
    assert!(v.detail.contains("lived on node 3"), "{}", v.detail);
    assert_eq!(report.removed_nodes.len(), 1);
    assert_eq!(report.removed_nodes[0].users, vec![B1.user]);

    // A read receipt for A stored on node 1 and lost: A never lived on node 3, a violation.
    h.push(Event::ReceiptSend {
        from: B1,
        to_user: A1.user,
        receipt_id: id(50),
        msg_ids: vec![id(1)],
        recipients: vec![A1],
    });
    h.push(Event::ReceiptAck {
        from: B1,
        receipt_id: id(50),
        status: "Ok".into(),
    });
    assert_eq!(kinds(&h.check()), vec![(ViolationKind::Lost, id(1))]);
}

#[test]
fn losses_a_removed_node_cannot_explain_stay_violations() {
    let lost_with = |steps: &dyn Fn(&mut Builder)| {
        let mut h = Builder::default();
        h.welcomed(A1, 1).welcomed(B1, 3);
        steps(&mut h);
        let report = h.check();
        (kinds(&report), report.counts.lost_unreplicated)
    };
    let lost = (vec![(ViolationKind::Lost, id(1))], 0);
    // Sent after the kill: it cannot have been stored on the dead node.
    assert_eq!(
        lost_with(&|h| {
            h.member(3, MemberAction::Kill)
                .send(A1, &[B1], 1, "Ok")
                .member(3, MemberAction::Remove);
        }),
        lost
    );
    // Acked after the removal: that ack promised a copy that survives.
    assert_eq!(
        lost_with(&|h| {
            h.push(Event::Send {
                from: A1,
                to_user: B1.user,
                msg_id: id(1),
                attempt: 1,
                recipients: vec![B1],
            });
            h.member(3, MemberAction::Kill)
                .member(3, MemberAction::Remove)
                .push(Event::SendAck {
                    from: A1,
                    msg_id: id(1),
                    attempt: 1,
                    status: "Ok".into(),
                    server_time_ms: 0,
                    group_seq: 0,
                });
        }),
        lost
    );
    // The node came back before it was removed (a drain, say): its data was not given up.
    assert_eq!(
        lost_with(&|h| {
            h.send(A1, &[B1], 1, "Ok")
                .member(3, MemberAction::Kill)
                .member(3, MemberAction::Ready)
                .member(3, MemberAction::Remove);
        }),
        lost
    );
    // The recipient had moved to node 2 before the kill.
    assert_eq!(
        lost_with(&|h| {
            h.welcomed(B1, 2)
                .send(A1, &[B1], 1, "Ok")
                .member(3, MemberAction::Kill)
                .member(3, MemberAction::Remove);
        }),
        lost
    );
    // Killed but never removed: it may come back with its data; until then, a loss.
    assert_eq!(
        lost_with(&|h| {
            h.send(A1, &[B1], 1, "Ok").member(3, MemberAction::Kill);
        }),
        lost
    );
}

#[test]
fn an_ok_received_after_the_kill_is_not_explained_by_the_removal() {
    // Sent while node 3 (B's home) was alive, but the `Ok` came after it was dead: node 3
    // cannot have given it, so whoever did promised a copy that must arrive.
    let mut h = Builder::default();
    h.welcomed(A1, 1).welcomed(B1, 3).push(Event::Send {
        from: A1,
        to_user: B1.user,
        msg_id: id(1),
        attempt: 1,
        recipients: vec![B1],
    });
    h.member(3, MemberAction::Kill)
        .push(Event::SendAck {
            from: A1,
            msg_id: id(1),
            attempt: 1,
            status: "Ok".into(),
            server_time_ms: 0,
            group_seq: 0,
        })
        .member(3, MemberAction::Remove);
    let report = h.check();
    assert_eq!(kinds(&report), vec![(ViolationKind::Lost, id(1))]);
    assert_eq!(report.violations[0].removed_node, None);
    assert_eq!(report.counts.lost_unreplicated, 0);

    // The same for a read receipt to A, whose home was the removed node.
    let mut h = Builder::default();
    h.welcomed(A1, 3)
        .welcomed(B1, 1)
        .send(A1, &[B1], 1, "Ok")
        .deliver(B1, A1, 1)
        .push(Event::ReceiptSend {
            from: B1,
            to_user: A1.user,
            receipt_id: id(50),
            msg_ids: vec![id(1)],
            recipients: vec![A1],
        });
    h.member(3, MemberAction::Kill)
        .push(Event::ReceiptAck {
            from: B1,
            receipt_id: id(50),
            status: "Ok".into(),
        })
        .member(3, MemberAction::Remove);
    let report = h.check();
    assert_eq!(kinds(&report), vec![(ViolationKind::Lost, id(1))]);
    assert_eq!(report.violations[0].subject, Subject::ReadReceipt);
    assert_eq!(report.counts.lost_unreplicated_receipts, 0);
}

#[test]
fn the_recipient_must_have_lived_on_the_removed_node_from_the_ack_to_the_kill() {
    let check = |steps: &dyn Fn(&mut Builder)| {
        let mut h = Builder::default();
        h.welcomed(A1, 1);
        steps(&mut h);
        let report = h.check();
        (kinds(&report), report.counts.lost_unreplicated)
    };
    let lost = (vec![(ViolationKind::Lost, id(1))], 0);
    let explained = (Vec::new(), 1);
    // Acked while B lived on node 2; B moved to node 3 before node 3 died: the acked copy was
    // stored on node 2 (or handed over with B), not given up with node 3.
    assert_eq!(
        check(&|h| {
            h.welcomed(B1, 2)
                .send(A1, &[B1], 1, "Ok")
                .welcomed(B1, 3)
                .member(3, MemberAction::Kill)
                .member(3, MemberAction::Remove);
        }),
        lost
    );
    // Nobody of B welcomed before the ack: where its inbox was is unknown.
    assert_eq!(
        check(&|h| {
            h.send(A1, &[B1], 1, "Ok")
                .welcomed(B1, 3)
                .member(3, MemberAction::Kill)
                .member(3, MemberAction::Remove);
        }),
        lost
    );
    // Welcomed by another node after the kill: its inbox may have lived on there.
    assert_eq!(
        check(&|h| {
            h.welcomed(B1, 3)
                .send(A1, &[B1], 1, "Ok")
                .member(3, MemberAction::Kill)
                .welcomed(B1, 2)
                .member(3, MemberAction::Remove);
        }),
        lost
    );
    // Acked before the kill while B lived on node 3, B reconnected to node 3 after a restart
    // and node 3 died for good: lost with the removed node, as expected.
    assert_eq!(
        check(&|h| {
            h.welcomed(B1, 3)
                .send(A1, &[B1], 1, "Ok")
                .member(3, MemberAction::Kill)
                .member(3, MemberAction::Ready)
                .welcomed(B1, 3)
                .member(3, MemberAction::Kill)
                .member(3, MemberAction::Down)
                .member(3, MemberAction::Remove);
        }),
        explained
    );
}

/// Builder steps for `delivered` receipts: a device's app acking what it was last handed, and
/// the node's receipt arriving.
impl Builder {
    fn ack_last(&mut self, at: Dev, ok: bool) -> &mut Self {
        let seq = self.seqs[&at];
        self.push(Event::Ack {
            at,
            seqs: vec![seq],
            ok,
        })
    }

    fn delivered_receipt(&mut self, at: Dev, by: Dev, msg: u8) -> &mut Self {
        let seq = self.seqs.entry(at).or_insert(0);
        *seq += 1;
        let seq = *seq;
        self.push(Event::Receipt {
            at,
            kind: "delivered".into(),
            by,
            msg_ids: vec![id(msg)],
            seq,
        })
    }
}

#[test]
fn a_missing_delivered_receipt_is_a_loss() {
    // A1 -> B1 (a copy for A2). B1 acks: every device of A is owed a delivered receipt.
    let mut h = Builder::default();
    h.send(A1, &[B1, A2], 1, "Ok")
        .deliver(B1, A1, 1)
        .deliver(A2, A1, 1)
        // A2 acking its own copy owes nobody a receipt.
        .ack_last(A2, true)
        .ack_last(B1, true)
        .delivered_receipt(A1, B1, 1);
    let report = h.check();
    assert_eq!(kinds(&report), vec![(ViolationKind::Lost, id(1))]);
    let v = &report.violations[0];
    assert_eq!(
        (v.subject, v.from, v.device),
        (Subject::DeliveredReceipt, B1, A2)
    );
    assert!(v.detail.contains("delivered receipt"), "{}", v.detail);
    assert_eq!(report.counts.delivered_receipts_due, 2);
    assert_eq!(report.counts.lost, 1);

    // Once it reached A2 too, nothing is missing; A2 acking the receipt owes nothing.
    h.delivered_receipt(A2, B1, 1).ack_last(A2, true);
    let report = h.check();
    assert!(report.passed(), "{:#?}", report.violations);
    assert_eq!(report.counts.delivered_receipts, 2);

    // A receipt may arrive before the recipient's ack is in the history.
    let mut h = Builder::default();
    h.send(A1, &[B1], 1, "Ok")
        .deliver(B1, A1, 1)
        .delivered_receipt(A1, B1, 1)
        .ack_last(B1, true);
    assert!(h.check().passed());
}

#[test]
fn no_delivered_receipt_is_owed_without_an_ack_that_was_written() {
    let mut h = Builder::default();
    h.send(A1, &[B1], 1, "Ok")
        .send(A1, &[B1], 2, "Ok")
        .deliver(B1, A1, 1)
        .deliver(B1, A1, 2)
        // The ack of message 2 failed; message 1 was never acked.
        .ack_last(B1, false);
    let report = h.check();
    assert!(report.passed(), "{:#?}", report.violations);
    assert_eq!(report.counts.delivered_receipts_due, 0);

    // Acking a receipt (on A1) owes nothing either.
    let mut h = Builder::default();
    h.send(A1, &[B1], 1, "Ok")
        .deliver(B1, A1, 1)
        .ack_last(B1, true)
        .delivered_receipt(A1, B1, 1)
        .ack_last(A1, true);
    let report = h.check();
    assert!(report.passed(), "{:#?}", report.violations);
    assert_eq!(report.counts.delivered_receipts_due, 1);
}

#[test]
fn a_delivered_receipt_lost_with_a_removed_node_is_explained() {
    let check = |steps: &dyn Fn(&mut Builder)| {
        let mut h = Builder::default();
        steps(&mut h);
        let report = h.check();
        let subjects: Vec<Subject> = report.unreplicated.iter().map(|v| v.subject).collect();
        (
            kinds(&report),
            report.counts.lost_unreplicated_delivered_receipts,
            subjects,
        )
    };
    let explained = (Vec::new(), 1, vec![Subject::DeliveredReceipt]);
    let lost = (vec![(ViolationKind::Lost, id(1))], 0, Vec::new());
    // B (the acking user) lived on node 3: the receipt was written into its outbox there with
    // the ack, and node 3 died before sending it.
    assert_eq!(
        check(&|h| {
            h.welcomed(A1, 1)
                .welcomed(B1, 3)
                .send(A1, &[B1], 1, "Ok")
                .deliver(B1, A1, 1)
                .ack_last(B1, true)
                .member(3, MemberAction::Kill)
                .member(3, MemberAction::Remove);
        }),
        explained
    );
    // A (the sender) lived on node 3: the receipt was stored in A1's inbox there.
    assert_eq!(
        check(&|h| {
            h.welcomed(A1, 3)
                .welcomed(B1, 1)
                .send(A1, &[B1], 1, "Ok")
                .deliver(B1, A1, 1)
                .ack_last(B1, true)
                .member(3, MemberAction::Kill)
                .member(3, MemberAction::Remove);
        }),
        explained
    );
    // B1 acked only after A's node was dead, and A was never welcomed again: nothing could
    // have taken the receipt to it.
    assert_eq!(
        check(&|h| {
            h.welcomed(A1, 3)
                .welcomed(B1, 1)
                .send(A1, &[B1], 1, "Ok")
                .deliver(B1, A1, 1)
                .member(3, MemberAction::Kill)
                .ack_last(B1, true)
                .member(3, MemberAction::Remove);
        }),
        explained
    );
    // ... but if A1 was welcomed again (by node 2), the receipt should have reached it.
    assert_eq!(
        check(&|h| {
            h.welcomed(A1, 3)
                .welcomed(B1, 1)
                .send(A1, &[B1], 1, "Ok")
                .deliver(B1, A1, 1)
                .member(3, MemberAction::Kill)
                .ack_last(B1, true)
                .welcomed(A1, 2)
                .member(3, MemberAction::Remove);
        }),
        lost
    );
    // Neither A nor B lived on the removed node: a loss.
    assert_eq!(
        check(&|h| {
            h.welcomed(A1, 1)
                .welcomed(B1, 2)
                .welcomed(C1, 3)
                .send(A1, &[B1], 1, "Ok")
                .deliver(B1, A1, 1)
                .ack_last(B1, true)
                .member(3, MemberAction::Kill)
                .member(3, MemberAction::Remove);
        }),
        lost
    );
    // Killed but never removed: it may come back with the receipt; until then, a loss.
    assert_eq!(
        check(&|h| {
            h.welcomed(A1, 1)
                .welcomed(B1, 3)
                .send(A1, &[B1], 1, "Ok")
                .deliver(B1, A1, 1)
                .ack_last(B1, true)
                .member(3, MemberAction::Kill);
        }),
        lost
    );
}

// ---- Property test: generated valid histories, then planted violations. ----

/// A valid history: users with 1 to 3 devices, messages from random devices to random other
/// users (acked, refused, or of unknown outcome), delivered to every recipient device in ack
/// order at random later times, interleaved across devices, and acked, with read receipts, the
/// delivered receipts the acks owe and fault windows sprinkled in.
fn valid_history(seed: u64) -> Vec<Record> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let users: Vec<u64> = (0..rng.gen_range(2..5)).map(|u| 15550000 + u).collect();
    let devices: HashMap<u64, Vec<Dev>> = users
        .iter()
        .map(|&user| {
            let n = rng.gen_range(1..4);
            (user, (1..=n).map(|device| Dev { user, device }).collect())
        })
        .collect();
    let mut events: Vec<(u64, Event)> = Vec::new();
    let mut t = 1_000_000u64;
    let mut device_clock: HashMap<Dev, u64> = HashMap::new();
    let mut seqs: HashMap<Dev, u64> = HashMap::new();
    let mut receipt_n = 0u32;
    for m in 0..rng.gen_range(0..60u32) {
        let from_user = users[rng.gen_range(0..users.len())];
        let from = devices[&from_user][rng.gen_range(0..devices[&from_user].len())];
        let to_user = loop {
            let u = users[rng.gen_range(0..users.len())];
            if u != from_user {
                break u;
            }
        };
        let mut recipients = devices[&to_user].clone();
        recipients.extend(devices[&from_user].iter().filter(|d| **d != from));
        let mut bytes = [0u8; 16];
        bytes[..4].copy_from_slice(&m.to_be_bytes());
        bytes[4..12].copy_from_slice(&seed.to_be_bytes());
        let msg_id = MsgId(bytes);
        t += rng.gen_range(1..5_000);
        events.push((
            t,
            Event::Send {
                from,
                to_user,
                msg_id,
                attempt: 1,
                recipients: recipients.clone(),
            },
        ));
        t += rng.gen_range(1..5_000);
        let outcome = rng.gen_range(0..10);
        let delivered_to: Vec<Dev> = if outcome < 8 {
            events.push((
                t,
                Event::SendAck {
                    from,
                    msg_id,
                    attempt: 1,
                    status: "Ok".into(),
                    server_time_ms: 0,
                    group_seq: 0,
                },
            ));
            recipients.clone()
        } else if outcome == 8 {
            events.push((
                t,
                Event::SendAck {
                    from,
                    msg_id,
                    attempt: 1,
                    status: "MismatchedDevices".into(),
                    server_time_ms: 0,
                    group_seq: 0,
                },
            ));
            Vec::new()
        } else {
            events.push((
                t,
                Event::SendError {
                    from,
                    msg_id,
                    attempt: 1,
                    error: "disconnected".into(),
                    code: None,
                },
            ));
            if rng.gen_bool(0.5) {
                recipients.clone()
            } else {
                Vec::new()
            }
        };
        let mut first_ack = Vec::new();
        for at in delivered_to {
            let clock = device_clock.entry(at).or_insert(0);
            // Deliveries may come before the ack arrives (t - 1000), never before the send.
            *clock = (*clock + 1).max(t.saturating_sub(1_000) + rng.gen_range(0..20_000));
            let seq = seqs.entry(at).or_insert(0);
            *seq += 1;
            events.push((
                *clock,
                Event::Deliver {
                    at,
                    seq: *seq,
                    msg_id,
                    from,
                    body: Some(BodyTag { to: at, msg_id }),
                },
            ));
            // The app acks what it was handed; one in ten acks fails to be written.
            let ok = rng.gen_bool(0.9);
            events.push((
                *clock + 1,
                Event::Ack {
                    at,
                    seqs: vec![*seq],
                    ok,
                },
            ));
            if ok && at.user == to_user {
                first_ack.push((*clock + 1, at));
            }
            if at.user == to_user && rng.gen_bool(0.2) {
                receipt_n += 1;
                let mut rid = [0xEE; 16];
                rid[..4].copy_from_slice(&receipt_n.to_be_bytes());
                let receipt_id = MsgId(rid);
                let rt = *clock + 10;
                let readers = devices[&from.user].clone();
                events.push((
                    rt,
                    Event::ReceiptSend {
                        from: at,
                        to_user: from.user,
                        receipt_id,
                        msg_ids: vec![msg_id],
                        recipients: readers.clone(),
                    },
                ));
                events.push((
                    rt + 5,
                    Event::ReceiptAck {
                        from: at,
                        receipt_id,
                        status: "Ok".into(),
                    },
                ));
                for reader in readers {
                    events.push((
                        rt + rng.gen_range(10..10_000),
                        Event::Receipt {
                            at: reader,
                            kind: "read".into(),
                            by: at,
                            msg_ids: vec![msg_id],
                            seq: 0,
                        },
                    ));
                }
            }
        }
        // The node's delivered receipt, owed to every device of the sender once the first
        // device of the recipient acked (it may arrive before that ack is in the history).
        if let Some(&(acked, by)) = first_ack.iter().min() {
            for &at in &devices[&from.user] {
                events.push((
                    acked + rng.gen_range(0..10_000) - 500,
                    Event::Receipt {
                        at,
                        kind: "delivered".into(),
                        by,
                        msg_ids: vec![msg_id],
                        seq: 0,
                    },
                ));
            }
        }
    }
    for f in 0..rng.gen_range(0..4u32) {
        let start = 1_000_000 + rng.gen_range(0..200_000);
        let kind = ["pause", "partition", "disk-full", "kill-restart"][rng.gen_range(0..4)];
        for (phase, at) in [(Phase::Start, start), (Phase::End, start + 50_000)] {
            events.push((
                at,
                Event::Fault {
                    id: f,
                    kind: kind.into(),
                    phase,
                    target: "node1".into(),
                    detail: String::new(),
                },
            ));
        }
    }
    let records: Vec<Record> = events
        .into_iter()
        .enumerate()
        .map(|(n, (t_us, event))| Record {
            t_us,
            src: "gen".into(),
            n: n as u64,
            event,
        })
        .collect();
    crate::history::merge(records)
}

/// Indexes of deliveries of acked messages.
fn acked_deliveries(records: &[Record]) -> Vec<usize> {
    let acked: HashSet<(Dev, MsgId)> = records
        .iter()
        .filter_map(|r| match &r.event {
            Event::SendAck {
                from,
                msg_id,
                status,
                ..
            } if status == "Ok" => Some((*from, *msg_id)),
            _ => None,
        })
        .collect();
    records
        .iter()
        .enumerate()
        .filter_map(|(i, r)| match &r.event {
            Event::Deliver { from, msg_id, .. } if acked.contains(&(*from, *msg_id)) => Some(i),
            _ => None,
        })
        .collect()
}

fn deliver_fields(record: &Record) -> (Dev, Dev, MsgId) {
    match &record.event {
        Event::Deliver {
            at, from, msg_id, ..
        } => (*at, *from, *msg_id),
        _ => unreachable!("not a delivery"),
    }
}

fn has(report: &CheckReport, kind: ViolationKind, msg_id: MsgId) -> bool {
    report
        .violations
        .iter()
        .any(|v| v.kind == kind && v.msg_id == msg_id)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn generated_valid_histories_pass(seed in any::<u64>()) {
        let records = valid_history(seed);
        let report = check(&records);
        prop_assert!(report.passed(), "{:#?}", report.violations);
        prop_assert_eq!(report.counts.lost + report.counts.duplicated, 0);
    }

    #[test]
    fn generated_history_with_planted_loss_is_found(seed in any::<u64>(), pick in any::<prop::sample::Index>()) {
        let mut records = valid_history(seed);
        let candidates = acked_deliveries(&records);
        prop_assume!(!candidates.is_empty());
        let (at, from, msg_id) = deliver_fields(&records[candidates[pick.index(candidates.len())]]);
        records.retain(|r| !matches!(&r.event,
            Event::Deliver { at: a, from: f, msg_id: m, .. } if (*a, *f, *m) == (at, from, msg_id)));
        let report = check(&records);
        prop_assert!(has(&report, ViolationKind::Lost, msg_id), "{:#?}", report.violations);
        prop_assert!(report.violations.iter().all(|v| v.kind == ViolationKind::Lost));
    }

    #[test]
    fn generated_history_with_planted_delivered_receipt_loss_is_found(seed in any::<u64>(), pick in any::<prop::sample::Index>()) {
        let mut records = valid_history(seed);
        let candidates: Vec<usize> = records.iter().enumerate()
            .filter(|(_, r)| matches!(&r.event, Event::Receipt { kind, .. } if kind == "delivered"))
            .map(|(i, _)| i)
            .collect();
        prop_assume!(!candidates.is_empty());
        let removed = records.remove(candidates[pick.index(candidates.len())]);
        let Event::Receipt { at, msg_ids, .. } = removed.event else { unreachable!() };
        let report = check(&records);
        prop_assert!(report.violations.iter().any(|v| v.kind == ViolationKind::Lost
            && v.subject == Subject::DeliveredReceipt
            && v.msg_id == msg_ids[0]
            && v.device == at), "{:#?}", report.violations);
        prop_assert_eq!(report.violations.len(), 1);
    }

    #[test]
    fn generated_history_with_planted_duplicate_is_found(seed in any::<u64>(), pick in any::<prop::sample::Index>()) {
        let mut records = valid_history(seed);
        let candidates: Vec<usize> = records.iter().enumerate()
            .filter(|(_, r)| matches!(r.event, Event::Deliver { .. }))
            .map(|(i, _)| i)
            .collect();
        prop_assume!(!candidates.is_empty());
        let i = candidates[pick.index(candidates.len())];
        let mut copy = records[i].clone();
        let (_, _, msg_id) = deliver_fields(&copy);
        copy.t_us += 1;
        copy.src = "dup".into();
        records.push(copy);
        let report = check(&crate::history::merge(records));
        prop_assert!(has(&report, ViolationKind::Duplicated, msg_id), "{:#?}", report.violations);
        prop_assert_eq!(report.counts.duplicated, 1);
    }

    #[test]
    fn generated_history_with_planted_reorder_is_found(seed in any::<u64>(), pick in any::<prop::sample::Index>()) {
        let mut records = valid_history(seed);
        let to_user: HashMap<(Dev, MsgId), u64> = records.iter().filter_map(|r| match &r.event {
            Event::Send { from, msg_id, to_user, .. } => Some(((*from, *msg_id), *to_user)),
            _ => None,
        }).collect();
        // Pairs of acked deliveries on one device from one sender in one conversation.
        let acked = acked_deliveries(&records);
        let mut pairs = Vec::new();
        for (x, &i) in acked.iter().enumerate() {
            let (at, from, m) = deliver_fields(&records[i]);
            for &j in &acked[x + 1..] {
                let (at2, from2, m2) = deliver_fields(&records[j]);
                if at == at2 && from == from2 && to_user[&(from, m)] == to_user[&(from2, m2)] {
                    pairs.push((i, j));
                }
            }
        }
        prop_assume!(!pairs.is_empty());
        let (i, j) = pairs[pick.index(pairs.len())];
        let (_, _, earlier) = deliver_fields(&records[i]);
        // Swap what the two deliveries carry; their times stay.
        let (ei, ej) = (records[i].event.clone(), records[j].event.clone());
        records[i].event = ej;
        records[j].event = ei;
        let report = check(&records);
        prop_assert!(has(&report, ViolationKind::Reordered, earlier), "{:#?}", report.violations);
        prop_assert!(report.violations.iter().all(|v| v.kind == ViolationKind::Reordered));
    }

    #[test]
    fn generated_history_with_planted_leak_is_found(
        seed in any::<u64>(),
        pick in any::<prop::sample::Index>(),
        wrong_body in any::<bool>(),
    ) {
        let mut records = valid_history(seed);
        let candidates: Vec<usize> = records.iter().enumerate()
            .filter(|(_, r)| matches!(r.event, Event::Deliver { .. }))
            .map(|(i, _)| i)
            .collect();
        prop_assume!(!candidates.is_empty());
        let i = candidates[pick.index(candidates.len())];
        let stranger = Dev { user: 19990000, device: 1 };
        let msg_id = match &mut records[i].event {
            Event::Deliver { at, body, msg_id, .. } => {
                if wrong_body {
                    // The right device, another device's ciphertext.
                    *body = Some(BodyTag { to: stranger, msg_id: *msg_id });
                } else {
                    *at = stranger;
                    *body = Some(BodyTag { to: stranger, msg_id: *msg_id });
                }
                *msg_id
            }
            _ => unreachable!(),
        };
        let report = check(&records);
        prop_assert!(has(&report, ViolationKind::Leaked, msg_id), "{:#?}", report.violations);
    }
}

/// Builder steps for groups.
impl Builder {
    fn group_send(&mut self, from: Dev, group: u8, to: &[Dev], msg: u8, status: &str) -> &mut Self {
        self.push(Event::GroupSend {
            from,
            group: id(group),
            msg_id: id(msg),
            attempt: 1,
            recipients: to.to_vec(),
        });
        self.push(Event::SendAck {
            from,
            msg_id: id(msg),
            attempt: 1,
            status: status.into(),
            server_time_ms: 0,
            group_seq: 0,
        })
    }

    fn group_deliver(
        &mut self,
        at: Dev,
        from: Dev,
        group: u8,
        group_seq: u64,
        msg: u8,
    ) -> &mut Self {
        let seq = self.seqs.entry(at).or_insert(0);
        *seq += 1;
        let seq = *seq;
        self.push(Event::GroupDeliver {
            at,
            seq,
            group: id(group),
            group_seq,
            msg_id: id(msg),
            from,
            body: Some(crate::history::GroupBodyTag {
                group: id(group),
                msg_id: id(msg),
            }),
        })
    }
}

#[test]
fn a_clean_group_history_passes_and_is_counted_apart() {
    let mut h = Builder::default();
    h.push(Event::Group {
        group: id(100),
        members: vec![A1.user, B1.user, C1.user],
        creator: A1,
    });
    h.group_send(A1, 100, &[A2, B1, C1], 1, "Ok")
        .group_send(B1, 100, &[A1, A2, C1], 2, "Ok")
        .group_deliver(A2, A1, 100, 1, 1)
        .group_deliver(B1, A1, 100, 1, 1)
        .group_deliver(C1, A1, 100, 1, 1)
        .group_deliver(A1, B1, 100, 2, 2)
        .group_deliver(A2, B1, 100, 2, 2)
        .group_deliver(C1, B1, 100, 2, 2);
    let report = h.check();
    assert!(report.passed(), "{:#?}", report.violations);
    let c = &report.counts;
    assert_eq!(
        (
            c.groups,
            c.group_sent,
            c.group_acked,
            c.group_expected_deliveries,
            c.group_delivered
        ),
        (1, 2, 2, 6, 6)
    );
    // The 1:1 counts do not include them.
    assert_eq!((c.sent, c.acked, c.delivered), (0, 0, 0));
}

#[test]
fn planted_group_violations_are_found() {
    // Lost: acked, C1 never gets it.
    let mut h = Builder::default();
    h.group_send(A1, 100, &[B1, C1], 1, "Ok")
        .group_deliver(B1, A1, 100, 1, 1);
    let report = h.check();
    assert_eq!(kinds(&report), vec![(ViolationKind::Lost, id(1))]);
    assert_eq!(report.violations[0].subject, Subject::GroupMessage);
    assert_eq!(report.violations[0].device, C1);

    // Duplicated: handed over twice on one device.
    let mut h = Builder::default();
    h.group_send(A1, 100, &[B1], 1, "Ok")
        .group_deliver(B1, A1, 100, 1, 1)
        .group_deliver(B1, A1, 100, 1, 1);
    assert_eq!(kinds(&h.check()), vec![(ViolationKind::Duplicated, id(1))]);

    // Reordered: seq 3 then seq 2 of one group on one device (another group's seqs are apart).
    let mut h = Builder::default();
    h.group_send(A1, 100, &[B1], 1, "Ok")
        .group_send(C1, 100, &[B1], 2, "Ok")
        .group_send(A1, 101, &[B1], 3, "Ok")
        .group_deliver(B1, A1, 100, 3, 1)
        .group_deliver(B1, A1, 101, 1, 3)
        .group_deliver(B1, C1, 100, 2, 2);
    assert_eq!(kinds(&h.check()), vec![(ViolationKind::Reordered, id(2))]);

    // Leaked: to a device that is not a member, and under another group's id.
    let mut h = Builder::default();
    h.group_send(A1, 100, &[B1], 1, "Ok")
        .group_deliver(B1, A1, 100, 1, 1)
        .group_deliver(C1, A1, 100, 1, 1);
    assert_eq!(kinds(&h.check()), vec![(ViolationKind::Leaked, id(1))]);
    let mut h = Builder::default();
    h.group_send(A1, 100, &[B1], 1, "Ok")
        .group_deliver(B1, A1, 101, 1, 1);
    assert_eq!(kinds(&h.check()), vec![(ViolationKind::Leaked, id(1))]);

    // Phantom: every attempt refused, yet delivered.
    let mut h = Builder::default();
    h.group_send(A1, 100, &[B1], 1, "Forbidden")
        .group_deliver(B1, A1, 100, 1, 1);
    assert_eq!(kinds(&h.check()), vec![(ViolationKind::Phantom, id(1))]);
}

#[test]
fn a_group_loss_with_a_removed_node_is_explained_only_when_the_node_may_have_held_it() {
    // Acked before node 3 (which C lived on) was killed and removed: explained.
    let mut h = Builder::default();
    h.welcomed(A1, 1)
        .welcomed(B1, 1)
        .welcomed(C1, 3)
        .group_send(A1, 100, &[B1, C1], 1, "Ok")
        .group_deliver(B1, A1, 100, 1, 1)
        .member(3, MemberAction::Kill)
        .member(3, MemberAction::Remove);
    let report = h.check();
    assert!(report.passed(), "{:#?}", report.violations);
    assert_eq!(report.counts.group_lost_unreplicated, 1);

    // Acked after the removal, for B on a live node: a violation.
    h.group_send(A1, 100, &[B1], 2, "Ok");
    assert_eq!(kinds(&h.check()), vec![(ViolationKind::Lost, id(2))]);
}

/// Builder steps for membership changes.
impl Builder {
    fn group_send_at(&mut self, from: Dev, group: u8, to: &[Dev], msg: u8, seq: u64) -> &mut Self {
        self.push(Event::GroupSend {
            from,
            group: id(group),
            msg_id: id(msg),
            attempt: 1,
            recipients: to.to_vec(),
        });
        self.push(Event::SendAck {
            from,
            msg_id: id(msg),
            attempt: 1,
            status: "Ok".into(),
            server_time_ms: 0,
            group_seq: seq,
        })
    }

    fn group_changed(&mut self, by: Dev, group: u8, version: u64, members: &[u64]) -> &mut Self {
        self.push(Event::GroupChanged {
            by,
            group: id(group),
            attempt: 1,
            version,
            members: members.to_vec(),
        })
    }

    fn group_event(
        &mut self,
        at: &[Dev],
        group: u8,
        group_seq: u64,
        added: &[u64],
        removed: &[u64],
    ) -> &mut Self {
        for &at in at {
            let seq = self.seqs.entry(at).or_insert(0);
            *seq += 1;
            let seq = *seq;
            self.push(Event::GroupEventDeliver {
                at,
                seq,
                group: id(group),
                group_seq,
                actor: A1.user,
                added: added.to_vec(),
                removed: removed.to_vec(),
            });
        }
        self
    }
}

/// Group 100 of A (creator, devices A1 and A2), B and C; message 1 from A1 at seq 2; C removed
/// at seq 3 (every device told, C's too); message 2 from B1 at seq 4, owed to A1 and A2 only.
fn churned() -> Builder {
    let mut h = Builder::default();
    h.push(Event::Group {
        group: id(100),
        members: vec![A1.user, B1.user, C1.user],
        creator: A1,
    });
    for d in [A1, A2, B1, C1] {
        h.push(Event::Device {
            dev: d,
            host: "client1".into(),
        });
    }
    h.group_send_at(A1, 100, &[A2, B1, C1], 1, 2)
        .group_deliver(A2, A1, 100, 2, 1)
        .group_deliver(B1, A1, 100, 2, 1)
        .group_deliver(C1, A1, 100, 2, 1)
        .group_changed(A1, 100, 3, &[A1.user, B1.user])
        .group_event(&[A1, A2, B1, C1], 100, 3, &[], &[C1.user])
        .group_send_at(B1, 100, &[A1, A2, C1], 2, 4)
        .group_deliver(A1, B1, 100, 4, 2)
        .group_deliver(A2, B1, 100, 4, 2);
    h
}

#[test]
fn group_messages_are_owed_to_the_members_at_their_group_seq() {
    let h = churned();
    let report = h.check();
    assert!(report.passed(), "{:#?}", report.violations);
    let c = &report.counts;
    assert_eq!(
        (c.group_expected_deliveries, c.group_delivered),
        (5, 5),
        "C1 is owed message 1 (seq 2), not message 2 (seq 4)"
    );
    assert_eq!(
        (
            c.group_changes,
            c.group_event_expected,
            c.group_event_deliveries
        ),
        (1, 4, 4)
    );
}

#[test]
fn a_message_reaching_a_removed_member_is_leaked() {
    let mut h = churned();
    h.group_deliver(C1, B1, 100, 4, 2);
    let report = h.check();
    assert_eq!(kinds(&report), vec![(ViolationKind::Leaked, id(2))]);
    assert_eq!(report.violations[0].device, C1);
}

#[test]
fn a_member_added_back_is_owed_what_follows() {
    let mut h = churned();
    h.group_changed(A1, 100, 5, &[A1.user, B1.user, C1.user])
        .group_event(&[A1, A2, B1, C1], 100, 5, &[C1.user], &[])
        .group_send_at(B1, 100, &[A1, A2, C1], 3, 6)
        .group_deliver(A1, B1, 100, 6, 3)
        .group_deliver(A2, B1, 100, 6, 3);
    let report = h.check();
    assert_eq!(kinds(&report), vec![(ViolationKind::Lost, id(3))]);
    assert_eq!(report.violations[0].device, C1);
    h.group_deliver(C1, B1, 100, 6, 3);
    assert!(h.check().passed());
}

#[test]
fn a_change_no_member_device_received_is_lost_and_its_user_uncertain() {
    let mut h = Builder::default();
    h.push(Event::Group {
        group: id(100),
        members: vec![A1.user, B1.user, C1.user],
        creator: A1,
    });
    h.group_changed(A1, 100, 2, &[A1.user, B1.user])
        .group_send_at(B1, 100, &[A1, A2, C1], 2, 3)
        .group_deliver(A1, B1, 100, 3, 2)
        .group_deliver(A2, B1, 100, 3, 2)
        .group_deliver(C1, B1, 100, 3, 2);
    let report = h.check();
    // One loss (the change); C1's delivery is neither leaked nor owed: its membership at
    // seq 3 is not known from what the devices received.
    assert_eq!(kinds(&report), vec![(ViolationKind::Lost, id(100))]);
    assert_eq!(report.violations[0].subject, Subject::GroupEvent);
    assert_eq!(report.counts.group_events_lost, 1);
}

#[test]
fn a_change_some_member_device_missed_is_lost_there() {
    let mut h = churned();
    // Another change, at seq 5: B1 never hears of it.
    h.group_changed(A1, 100, 5, &[A1.user, B1.user, C1.user])
        .group_event(&[A1, A2, C1], 100, 5, &[C1.user], &[]);
    let report = h.check();
    assert_eq!(kinds(&report), vec![(ViolationKind::Lost, id(100))]);
    assert_eq!(
        (report.violations[0].subject, report.violations[0].device),
        (Subject::GroupEvent, B1)
    );
}

#[test]
fn changes_and_messages_share_one_order_per_device() {
    let mut h = churned();
    // A2 gets the change at seq 3 again out of order (after seq 4): duplicated, not reordered.
    h.group_event(&[A2], 100, 3, &[], &[C1.user]);
    let report = h.check();
    assert_eq!(kinds(&report), vec![(ViolationKind::Duplicated, id(100))]);
    // A change at seq 5 handed to B1 before message seq 4: B1 then gets seq 4 out of order.
    let mut h = Builder::default();
    h.push(Event::Group {
        group: id(100),
        members: vec![A1.user, B1.user],
        creator: A1,
    });
    h.group_send_at(A1, 100, &[B1], 1, 4)
        .group_changed(A1, 100, 5, &[A1.user, B1.user, C1.user])
        .group_event(&[A1, B1, C1], 100, 5, &[C1.user], &[])
        .group_deliver(B1, A1, 100, 4, 1);
    let report = h.check();
    assert_eq!(kinds(&report), vec![(ViolationKind::Reordered, id(1))]);
}

#[test]
fn an_abandoned_change_leaves_its_user_unchecked() {
    let mut h = churned();
    h.push(Event::GroupChangeAbandoned {
        by: A1,
        group: id(100),
        add: vec![C1.user],
        remove: vec![],
    });
    // Whether C was added back is unknown: a later message reaching C1 is not leaked, and
    // C1 missing one is not lost.
    h.group_send_at(B1, 100, &[A1, A2, C1], 3, 6)
        .group_deliver(A1, B1, 100, 6, 3)
        .group_deliver(A2, B1, 100, 6, 3)
        .group_deliver(C1, B1, 100, 6, 3);
    assert!(h.check().passed());
}

#[test]
fn a_copy_at_an_earlier_seq_than_acked_is_a_resequencing_not_a_reorder() {
    // Sequenced at 4 (answer lost), sequenced again at 5 after the node's clock jumped past
    // the dedup window: devices keep the copy at 4.
    let mut h = churned();
    h.group_send_at(B1, 100, &[A1, A2], 3, 6)
        .group_deliver(A1, B1, 100, 5, 3)
        .group_deliver(A2, B1, 100, 5, 3);
    assert!(h.check().passed());
    // A copy later than the acked seq is not explained that way.
    let mut h = churned();
    h.group_send_at(B1, 100, &[A1, A2], 3, 5)
        .group_deliver(A1, B1, 100, 6, 3)
        .group_deliver(A2, B1, 100, 5, 3);
    assert_eq!(kinds(&h.check()), vec![(ViolationKind::Reordered, id(3))]);
}
