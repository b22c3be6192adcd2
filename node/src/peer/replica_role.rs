//! Who may send a replica a shard's log records.
//!
//! `Replicate` writes straight into the receiver's copy of a shard, below every service: from
//! anyone but the shard's primary it would let a stale node (it was primary at an older epoch)
//! or a hostile one overwrite the replica's copy, which is the copy a failover promotes. So the
//! receiver checks every shard named against its own ring, after catching up to the sender's
//! epoch as forwards do: the sender must be the shard's primary (`ring.replicas(shard)[0]`) and
//! the receiver one of its replicas.

use ringpost_coordinator::NodeId;
use ringpost_wire::ErrorCode;
use tracing::warn;

use super::PeerResponse;
use crate::ring::Ring;
use crate::shard::ShardId;

/// Checks a `Replicate` from node `from`, sent at its epoch `epoch`, naming `shards`, against
/// `ring`, the receiving node `me`'s current one. `None` means serve it; otherwise the answer
/// to send instead:
/// - [`PeerResponse::WrongOwner`] if `ring` is at another epoch than the sender's (the sender
///   is behind, or this node could not catch up) and the roles do not hold in it;
/// - [`PeerResponse::Error`] with [`ErrorCode::Forbidden`] if at the same epoch `from` is not
///   the primary of one of the shards, or `me` is not one of its replicas.
pub fn replicate_refusal(
    ring: &Ring,
    me: NodeId,
    from: NodeId,
    epoch: u64,
    shards: &[ShardId],
) -> Option<PeerResponse> {
    let (shard, placement) =
        shards
            .iter()
            .map(|&s| (s, ring.replicas(s)))
            .find(|(_, placement)| {
                placement.first() != Some(&from) || !placement.iter().skip(1).any(|&n| n == me)
            })?;
    if ring.epoch != epoch {
        return Some(PeerResponse::WrongOwner { epoch: ring.epoch });
    }
    let message = format!(
        "node {from} may not replicate shard {shard} to node {me}: at epoch {} it is placed on \
         {placement:?} (primary first), and only the primary sends records to its replicas",
        ring.epoch
    );
    warn!(peer = from, shard, epoch = ring.epoch, %message, "refused a replicate request");
    Some(PeerResponse::Error {
        code: ErrorCode::Forbidden.as_u16(),
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringpost_coordinator::{testing, MemberState};

    fn ring(nodes: &[NodeId], factor: u32) -> Ring {
        let active: Vec<_> = nodes.iter().map(|&id| (id, MemberState::Active)).collect();
        Ring::from_view(&testing::view(4, 64, factor, &active))
    }

    #[test]
    fn only_the_primary_may_send_and_only_to_its_replicas() {
        let r = ring(&[1, 2, 3], 2);
        let shard = 5;
        let (primary, replica) = (r.replicas(shard)[0], r.replicas(shard)[1]);
        let outsider = [1, 2, 3]
            .into_iter()
            .find(|n| !r.replicas(shard).contains(n))
            .unwrap();
        assert_eq!(
            replicate_refusal(&r, replica, primary, 4, &[shard]),
            None,
            "the primary to its replica"
        );
        // The replica, or a node holding no copy, posing as the primary.
        for from in [replica, outsider, 9] {
            let refusal = replicate_refusal(&r, replica, from, 4, &[shard]);
            assert!(
                matches!(&refusal, Some(PeerResponse::Error { code, message })
                    if *code == ErrorCode::Forbidden.as_u16()
                        && message.contains(&format!("node {from} may not replicate shard {shard}"))),
                "{refusal:?}"
            );
        }
        // The primary, but to a node that holds no copy (or to itself).
        for to in [outsider, primary] {
            assert!(matches!(
                replicate_refusal(&r, to, primary, 4, &[shard]),
                Some(PeerResponse::Error { .. })
            ));
        }
        // One shard of several is enough to refuse the request.
        let other = (0..64).find(|&s| r.replicas(s)[0] != primary).unwrap();
        assert!(replicate_refusal(&r, replica, primary, 4, &[shard, other]).is_some());
        // A sender at another epoch whose roles do not hold here: it is told this node's.
        assert_eq!(
            replicate_refusal(&r, replica, outsider, 3, &[shard]),
            Some(PeerResponse::WrongOwner { epoch: 4 })
        );
        // One node, or factor 1: a shard has no replicas at all.
        let single = ring(&[1, 2, 3], 1);
        let p = single.replicas(shard)[0];
        let n = [1, 2, 3].into_iter().find(|&n| n != p).unwrap();
        assert!(replicate_refusal(&single, n, p, 4, &[shard]).is_some());
        assert_eq!(replicate_refusal(&r, replica, primary, 4, &[]), None);
    }
}
