//! Who may ask for a shard hand-off.
//!
//! `Holdings`, `Export` and `Release` are the pulling side of a hand-off (see
//! [`crate::cluster`]): the node that the ring names as a shard's owner asks every other live
//! member for the rows it still holds, copies them, and then tells the holder to delete its
//! copy. Any other node asking is either stale (it owned the shard at an older epoch) or
//! hostile: `Export` would hand it the shard's inboxes and accounts, and `Release` with the
//! digest of what it exported would make the holder delete the only copy. So the serving node
//! checks every asked shard against its own ring (after catching up to the requester's epoch)
//! and answers anyone but the owner with an explicit `Forbidden` error.

use ringpost_coordinator::NodeId;
use ringpost_wire::ErrorCode;
use tracing::warn;

use super::PeerResponse;
use crate::ring::Ring;
use crate::shard::ShardId;

/// Checks a hand-off request `what` (for the log and the refusal) from node `from` about
/// `shards` against `ring`, the serving node `me`'s current one. `None` means serve it;
/// otherwise the answer to send instead:
/// - [`PeerResponse::WrongOwner`] if `me` owns one of the shards (nothing to hand off: the
///   requester's view is behind);
/// - [`PeerResponse::Error`] with [`ErrorCode::Forbidden`] if `from` is not the owner of one
///   of them at `ring.epoch`.
pub fn handoff_refusal(
    ring: &Ring,
    me: NodeId,
    from: NodeId,
    what: &str,
    shards: &[ShardId],
) -> Option<PeerResponse> {
    if shards.iter().any(|&s| ring.owner(s) == Some(me)) {
        return Some(PeerResponse::WrongOwner { epoch: ring.epoch });
    }
    let (shard, owner) = shards
        .iter()
        .map(|&s| (s, ring.owner(s)))
        .find(|&(_, owner)| owner != Some(from))?;
    let owner = owner.map_or_else(|| "nobody".to_owned(), |o| format!("node {o}"));
    let message = format!(
        "node {from} may not {what} shard {shard}: at epoch {} its owner is {owner}, and only \
         the owner pulls a shard",
        ring.epoch
    );
    warn!(peer = from, shard, epoch = ring.epoch, %message, "refused a hand-off request");
    Some(PeerResponse::Error {
        code: ErrorCode::Forbidden.as_u16(),
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringpost_coordinator::{testing, MemberState};

    fn ring(states: &[(NodeId, MemberState)]) -> Ring {
        Ring::from_view(&testing::view(4, 64, 1, states))
    }

    #[test]
    fn only_the_owner_may_pull() {
        // Node 1 owns every shard; 2 is draining (the holder); 3 is joining.
        let r = ring(&[
            (1, MemberState::Active),
            (2, MemberState::Draining),
            (3, MemberState::Joining),
        ]);
        assert_eq!(handoff_refusal(&r, 2, 1, "export", &[0, 5, 63]), None);
        for from in [3, 9] {
            let refusal = handoff_refusal(&r, 2, from, "export", &[0, 5]);
            assert!(
                matches!(&refusal, Some(PeerResponse::Error { code, message })
                    if *code == ErrorCode::Forbidden.as_u16()
                        && message.contains(&format!("node {from} may not export shard 0"))
                        && message.contains("its owner is node 1")),
                "{refusal:?}"
            );
        }
        // The holder owns it after all: the requester's view is behind.
        assert_eq!(
            handoff_refusal(&r, 1, 3, "export", &[0]),
            Some(PeerResponse::WrongOwner { epoch: 4 })
        );
        // Nobody owns anything: nobody may pull.
        let r = ring(&[(1, MemberState::Draining), (2, MemberState::Down)]);
        assert!(matches!(
            handoff_refusal(&r, 2, 1, "release", &[0]),
            Some(PeerResponse::Error { message, .. }) if message.contains("owner is nobody")
        ));
        assert_eq!(handoff_refusal(&r, 2, 1, "release", &[]), None);
    }
}
