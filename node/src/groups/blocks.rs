//! Blocking in groups: a user who blocks the actor cannot be added by it. Block lists live on
//! each user's owner node ([`crate::contacts`]), so before a create or an add the group's owner
//! asks the added users' owners, one [`PeerRequest::Blockers`] per node (its own users
//! locally), and refuses the whole request if any added user blocks the actor. The check is
//! made before the group's lock is taken; a block made while the request is in flight may miss
//! it, as if the block came a moment later.

use std::collections::BTreeMap;
use std::sync::Arc;

use ringpost_coordinator::NodeId;
use ringpost_wire::limits::GROUP_MEMBERS_MAX;
use ringpost_wire::{ErrorCode, UserId};

use crate::forward::ROUTE_RETRY_AFTER_MS;
use crate::peer::{PeerRequest, PeerResponse};
use crate::routing::Route;
use crate::server::Server;
use crate::session::Answer;

/// What a refused add is told: the same for every added user, and like other refusals.
pub const BLOCKED_ADD_MESSAGE: &str = "a user cannot be added to this group";

/// Refuses (with the documented answer) an add of `added` by `actor` if one of them blocks
/// `actor`; a retryable error if an owner could not be asked.
pub async fn check_adds(
    server: &Arc<Server>,
    actor: UserId,
    added: &[UserId],
) -> Result<(), Answer> {
    let mut local = Vec::new();
    let mut remote: BTreeMap<NodeId, (u64, Vec<UserId>)> = BTreeMap::new();
    for &u in added.iter().filter(|&&u| u != actor) {
        match server.routing.route(u) {
            Route::Local { .. } => local.push(u),
            Route::Remote { node, epoch, .. } => {
                remote.entry(node).or_insert((epoch, vec![])).1.push(u)
            }
            Route::Unowned => return Err(unreachable()),
        }
    }
    if !local.is_empty() {
        match blockers(server, actor, &local) {
            Ok(b) if b.is_empty() => {}
            Ok(_) => return Err(refusal(server)),
            Err(e) => return Err(e),
        }
    }
    let calls = remote.into_iter().map(|(node, (epoch, users))| {
        let server = server.clone();
        async move {
            let request = PeerRequest::Blockers { actor, users };
            server.call_peer(node, epoch, request).await
        }
    });
    for answer in futures::future::join_all(calls).await {
        match answer {
            Ok(PeerResponse::Users(b)) if b.is_empty() => {}
            Ok(PeerResponse::Users(_)) => return Err(refusal(server)),
            _ => return Err(unreachable()),
        }
    }
    Ok(())
}

/// Which of `users` (this node's) block `actor`: the serving side of
/// [`PeerRequest::Blockers`]. `Err` if one is not served here now, or there are too many.
pub fn blockers(server: &Server, actor: UserId, users: &[UserId]) -> Result<Vec<UserId>, Answer> {
    if users.len() > GROUP_MEMBERS_MAX {
        return Err(Answer::Error {
            code: ErrorCode::LimitExceeded,
            message: "too many users in one block check".into(),
            retry_after_ms: 0,
        });
    }
    let mut out = Vec::new();
    for &u in users {
        if server.serves_here(u).is_some() {
            return Err(unreachable());
        }
        match server.contacts.is_blocked(u, actor) {
            Ok(true) => out.push(u),
            Ok(false) => {}
            Err(e) => {
                return Err(Answer::Error {
                    code: ErrorCode::StorageUnavailable,
                    message: e.to_string(),
                    retry_after_ms: ROUTE_RETRY_AFTER_MS,
                })
            }
        }
    }
    Ok(out)
}

fn refusal(server: &Server) -> Answer {
    server
        .groups
        .metrics
        .adds_blocked
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Answer::Error {
        code: ErrorCode::Forbidden,
        message: BLOCKED_ADD_MESSAGE.into(),
        retry_after_ms: 0,
    }
}

fn unreachable() -> Answer {
    Answer::Error {
        code: ErrorCode::WrongOwner,
        message: "could not check the added users' block lists; retry".into(),
        retry_after_ms: ROUTE_RETRY_AFTER_MS,
    }
}
