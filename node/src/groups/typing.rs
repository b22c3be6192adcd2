//! Typing in groups: a member's `Typing{group}` goes to the connected devices of the other
//! members, never stored. The typer's node has already charged it (the messaging budget and
//! `TYPING_PER_S_MAX`) and forwards it to the group's owner like a group request; the owner
//! checks membership and sends it on once per destination node (one
//! [`PeerRequest::GroupTyping`] naming that node's members, its own members directly). Each
//! member's node drops it for a member that blocks the typer. Best effort throughout: a lost
//! indicator is never retried.

use std::collections::BTreeMap;
use std::sync::Arc;

use ringpost_coordinator::NodeId;
use ringpost_wire::{DeviceId, GroupId, Typing, UserId};

use super::GroupError;
use crate::peer::PeerRequest;
use crate::routing::Route;
use crate::server::Server;

/// Sends `t` (from `user`/`device`, in `group`) to the other members' nodes: this is the
/// group's owner. Refused (and dropped) for a non-member.
pub fn fan_out(
    server: &Arc<Server>,
    user: UserId,
    device: DeviceId,
    group: GroupId,
    t: &Typing,
) -> Result<(), GroupError> {
    let state = server.groups.load(&group)?.ok_or(GroupError::NotFound)?;
    if state.members.binary_search(&user).is_err() {
        return Err(GroupError::NotMember);
    }
    server
        .groups
        .metrics
        .typing
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut remote: BTreeMap<NodeId, (u64, Vec<UserId>)> = BTreeMap::new();
    for &m in state.members.iter().filter(|&&m| m != user) {
        match server.routing.route(m) {
            Route::Local { .. } => {
                server.push_typing(m, user, device, t.typing, t.recording, Some(group))
            }
            Route::Remote { node, epoch, .. } => {
                remote.entry(node).or_insert((epoch, vec![])).1.push(m)
            }
            Route::Unowned => {}
        }
    }
    for (node, (epoch, to)) in remote {
        let server = server.clone();
        let request = PeerRequest::GroupTyping {
            group,
            to,
            from_user: user,
            from_device: device,
            typing: t.typing,
            recording: t.recording,
        };
        tokio::spawn(async move {
            let _ = server.call_peer(node, epoch, request).await;
        });
    }
    Ok(())
}
