//! Aggregated group receipts on a real RocksDB: one receipt per sender once every other
//! member passed its message, none per member.

use super::*;
use crate::groups::receipts::{Kind, GROUP_RECEIPT_INDEX_SEQS};
use ringpost_wire::ReceiptKind::{Delivered, Read};

/// The receipt records in the log now (drained like the fan-out does): (kind, to, msg_ids).
fn receipts(g: &Groups) -> Vec<(Kind, UserId, Vec<MsgId>)> {
    drain(g)
        .into_iter()
        .filter_map(|r| match r.body {
            LogBody::Receipt { kind, msg_ids, .. } => Some((kind, r.pending[0], msg_ids)),
            _ => None,
        })
        .collect()
}

fn index_rows(g: &Groups) -> usize {
    let from = g.row(&G, receipts_tag(), &[]);
    let to = crate::storage::prefix_end(&from);
    g.engine.scan(Cf::Groups, &from, &to, 10_000).unwrap().len()
}

fn receipts_tag() -> u8 {
    crate::groups::receipts::TAG_INDEX
}

#[test]
fn a_sender_gets_one_receipt_once_every_other_member_passed_its_message() {
    let (g, _dir) = service();
    g.create(G, 1, &[2, 3], b"", 10).unwrap();
    g.send(1, 1, &G, [0xa; 16], b"a", 11).unwrap(); // seq 2
    g.send(2, 1, &G, [0xb; 16], b"b", 12).unwrap(); // seq 3
    drain(&g);

    // One member is not enough; nothing is logged for the sender.
    assert_eq!(g.receipt(2, &G, Delivered, 3, 13).unwrap(), 0);
    // The last other member passes seq 2 (from 1): one receipt to 1. Seq 3 (from 2) still
    // waits for member 1, whose own message does not count for it.
    assert_eq!(g.receipt(3, &G, Delivered, 99, 14).unwrap(), 1);
    assert_eq!(receipts(&g), vec![(Kind::Delivered, 1, vec![[0xa; 16]])]);
    // A read watermark raises the delivered one too.
    assert_eq!(g.receipt(1, &G, Read, 3, 15).unwrap(), 1);
    assert_eq!(receipts(&g), vec![(Kind::Delivered, 2, vec![[0xb; 16]])]);
    // Repeats and lower watermarks change nothing and log nothing.
    assert_eq!(g.receipt(1, &G, Read, 3, 16).unwrap(), 0);
    assert_eq!(g.receipt(3, &G, Delivered, 1, 16).unwrap(), 0);
    assert!(receipts(&g).is_empty());

    // Reads: 1 and 2 read everything; 3 has not, which holds both back. Removing 3
    // completes both messages' reads, in the removal's own batch.
    assert_eq!(g.receipt(2, &G, Read, 3, 17).unwrap(), 0);
    let mut u = GroupUpdate::new(G);
    u.remove = vec![3];
    g.update(1, &u, CODE, 18).unwrap(); // seq 4
    assert_eq!(
        receipts(&g),
        vec![
            (Kind::Read, 1, vec![[0xa; 16]]),
            (Kind::Read, 2, vec![[0xb; 16]])
        ]
    );
    // Both receipts went out for both messages: their index rows are gone.
    assert_eq!(index_rows(&g), 0);

    // A member added later starts at the change that added it: it holds back only messages
    // after that.
    let mut u = GroupUpdate::new(G);
    u.add = vec![4];
    g.update(1, &u, CODE, 19).unwrap(); // seq 5
    g.send(1, 1, &G, [0xc; 16], b"c", 20).unwrap(); // seq 6
    drain(&g);
    assert_eq!(g.receipt(2, &G, Delivered, 6, 21).unwrap(), 0);
    assert_eq!(g.receipt(4, &G, Delivered, 6, 22).unwrap(), 1);
    assert_eq!(receipts(&g), vec![(Kind::Delivered, 1, vec![[0xc; 16]])]);

    // Non-members may not report.
    assert!(matches!(
        g.receipt(3, &G, Delivered, 6, 23),
        Err(GroupError::NotMember)
    ));
}

#[test]
fn many_messages_of_one_sender_are_coalesced_and_the_index_is_bounded() {
    let (g, _dir) = service();
    g.create(G, 1, &[2], b"", 10).unwrap();
    let n = GROUP_RECEIPT_INDEX_SEQS + 3;
    for i in 0..n {
        let mut id = [0u8; 16];
        id[8..].copy_from_slice(&i.to_be_bytes());
        g.send(1, 1, &G, id, b"m", 11).unwrap(); // seqs 2..=n+1
    }
    drain(&g);
    // Only the last GROUP_RECEIPT_INDEX_SEQS seqs keep their message.
    assert_eq!(index_rows(&g) as u64, GROUP_RECEIPT_INDEX_SEQS);
    assert_eq!(g.receipt(2, &G, Delivered, n + 1, 12).unwrap(), 4);
    let got = receipts(&g);
    // Coalesced: 1024 ids in chunks of RECEIPT_MSG_IDS_MAX, in seq order, all to user 1.
    assert_eq!(got.len(), 4);
    assert!(got.iter().all(|(k, to, ids)| *k == Kind::Delivered
        && *to == 1
        && ids.len() == ringpost_wire::limits::RECEIPT_MSG_IDS_MAX));
    let first: u64 = u64::from_be_bytes(got[0].2[0][8..].try_into().unwrap());
    assert_eq!(first, 3, "the first three fell out of the window");
}
