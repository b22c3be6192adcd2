//! Device requests about groups. The device's node (its user's owner) executes a request
//! itself when it owns the group's shard, and otherwise forwards it to the group's owner as a
//! [`PeerRequest::Group`] (the encoded frame, with the device and the group id), following
//! `WrongOwner` answers as stores do. The device is never redirected: its connection belongs
//! to its user's owner, and a group's members are spread over the whole cluster.
//!
//! A `GroupCreate` gets its id here: 16 random bytes, drawn by the device's node and carried
//! to the owner of the id's shard.

use std::sync::Arc;

use futures::future::BoxFuture;
use ringpost_wire::limits::GROUP_INVITE_CODE_BYTES;
use ringpost_wire::{Body, DeviceId, ErrorCode, Frame, GroupId, SendAck, SendStatus, UserId};

use super::{fanout, route_id, GroupError, Sent};
use crate::forward::{ROUTE_ATTEMPTS_MAX, ROUTE_RETRY_AFTER_MS, ROUTE_RETRY_PAUSE};
use crate::peer::{PeerRequest, PeerResponse};
use crate::routing::{Route, EPOCH_CATCH_UP_WAIT, SHARD_READY_WAIT};
use crate::server::{error, refused, Server};
use crate::session::Answer;

/// The group a request is about (a fresh random id for a create); `None` for other frames.
fn group_of(body: &Body) -> Option<GroupId> {
    match body {
        Body::GroupCreate(_) => Some(rand::random()),
        Body::GroupUpdate(u) => Some(u.group),
        Body::GroupInfoRequest(r) => Some(r.group),
        Body::GroupSend(s) => Some(s.group),
        Body::GroupReceipt(r) => Some(r.group),
        Body::Typing(t) => t.group,
        _ => None,
    }
}

/// Executes a device's group request, here or on the group's owner.
pub fn request(
    server: &Arc<Server>,
    user: UserId,
    device: DeviceId,
    body: Body,
) -> BoxFuture<'static, Answer> {
    let server = server.clone();
    Box::pin(async move {
        let Some(group) = group_of(&body) else {
            return error(ErrorCode::UnexpectedFrame, "not a group request");
        };
        let id = route_id(&group);
        let mut waited = false;
        for _ in 0..ROUTE_ATTEMPTS_MAX {
            match server.routing.route(id) {
                Route::Local { shard } => {
                    if !server.routing.is_ready(shard) && !waited {
                        waited = true;
                        server.routing.wait_ready(id, SHARD_READY_WAIT).await;
                        continue;
                    }
                    if let Some(answer) = server.serves_here(id) {
                        return answer_of_redirect(answer);
                    }
                    return local(&server, user, device, group, body).await;
                }
                Route::Remote { node, epoch, .. } => {
                    let frame = match Frame::new(0, body.clone()).encode() {
                        Ok(f) => f.to_vec(),
                        Err(e) => return error(ErrorCode::Internal, &e.to_string()),
                    };
                    server
                        .groups
                        .metrics
                        .forwarded
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let request = PeerRequest::Group {
                        from_user: user,
                        from_device: device,
                        group,
                        frame,
                    };
                    match server.call_peer(node, epoch, request).await {
                        Ok(PeerResponse::Frames(frames)) => {
                            return crate::forward::relayed_frames(node, &frames)
                        }
                        Ok(PeerResponse::Error { code, message }) => {
                            return refused(code, message, 0)
                        }
                        Ok(PeerResponse::WrongOwner { epoch: theirs }) => {
                            server
                                .routing
                                .wait_epoch(theirs.max(epoch + 1), EPOCH_CATCH_UP_WAIT)
                                .await;
                        }
                        Ok(other) => {
                            return error(
                                ErrorCode::Internal,
                                &format!("node {node} answered a group request with {other:?}"),
                            )
                        }
                        Err(_) => tokio::time::sleep(ROUTE_RETRY_PAUSE).await,
                    }
                }
                Route::Unowned => {
                    let epoch = server.routing.epoch();
                    server
                        .routing
                        .wait_epoch(epoch + 1, EPOCH_CATCH_UP_WAIT)
                        .await;
                }
            }
        }
        Answer::Error {
            code: ErrorCode::WrongOwner,
            message: "could not reach the group's owner; retry".into(),
            retry_after_ms: ROUTE_RETRY_AFTER_MS,
        }
    })
}

/// `serves_here` answers a Redirect for a remote owner; a group request is never redirected.
fn answer_of_redirect(answer: Answer) -> Answer {
    match answer {
        Answer::Redirect(_) => Answer::Error {
            code: ErrorCode::WrongOwner,
            message: "the group moved while the request was routed; retry".into(),
            retry_after_ms: ROUTE_RETRY_AFTER_MS,
        },
        other => other,
    }
}

/// Serves another node's forwarded group request, if this node owns the group now.
pub async fn peer(
    server: &Arc<Server>,
    from_user: UserId,
    from_device: DeviceId,
    group: GroupId,
    frame: &[u8],
) -> PeerResponse {
    let body = match Frame::decode(frame) {
        Ok(f) => f.body,
        Err(e) => {
            return PeerResponse::Error {
                code: ErrorCode::Malformed.as_u16(),
                message: format!("bad group frame: {e}"),
            }
        }
    };
    // The id in the envelope must be the frame's (a create carries only the envelope's).
    let consistent = match &body {
        Body::GroupCreate(_) => true,
        other => group_of(other) == Some(group),
    };
    if !consistent {
        return PeerResponse::Error {
            code: ErrorCode::Malformed.as_u16(),
            message: "the group id does not match the frame".into(),
        };
    }
    if server.gate(route_id(&group)).await.is_err() {
        return PeerResponse::WrongOwner {
            epoch: server.routing.epoch(),
        };
    }
    match local(server, from_user, from_device, group, body).await {
        Answer::Frames(frames) => PeerResponse::Frames(
            frames
                .iter()
                .filter_map(|f| f.encode().ok().map(|b| b.to_vec()))
                .collect(),
        ),
        Answer::Error { code, message, .. } => PeerResponse::Error {
            code: code.as_u16(),
            message,
        },
        Answer::Authenticated { .. } | Answer::Redirect(_) => PeerResponse::WrongOwner {
            epoch: server.routing.epoch(),
        },
    }
}

/// Executes a group request on the group's owner (this node): one synced write, then the
/// fan-out of the new log record is started.
async fn local(
    server: &Arc<Server>,
    user: UserId,
    device: DeviceId,
    group: GroupId,
    body: Body,
) -> Answer {
    if let Body::Typing(t) = &body {
        // Answered with nothing either way, like the indicator itself.
        if super::typing::fan_out(server, user, device, group, t).is_err() {
            server
                .groups
                .metrics
                .refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        return Answer::Frames(vec![]);
    }
    // Blocks: nobody is added by a user it blocks (asked on the added users' owners).
    let added: &[UserId] = match &body {
        Body::GroupCreate(c) => &c.members,
        Body::GroupUpdate(u) => &u.add,
        _ => &[],
    };
    if !added.is_empty() {
        if let Err(refused) = super::blocks::check_adds(server, user, added).await {
            server
                .groups
                .metrics
                .refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return refused;
        }
    }
    let groups = server.groups.clone();
    let now = server.now_ms();
    let result = tokio::task::spawn_blocking(move || -> Result<(Frame, bool), GroupError> {
        match body {
            Body::GroupCreate(c) => {
                let info = groups.create(group, user, &c.members, &c.meta, now)?;
                Ok((Frame::new(0, info), true))
            }
            Body::GroupUpdate(u) => {
                let code: [u8; GROUP_INVITE_CODE_BYTES] = rand::random();
                let info = groups.update(user, &u, code, now)?;
                Ok((Frame::new(0, info), true))
            }
            Body::GroupInfoRequest(r) => Ok((Frame::new(0, groups.info(user, &r.group)?), false)),
            Body::GroupSend(s) => {
                let sent = groups.send(user, device, &s.group, s.msg_id, &s.body, now)?;
                let (new, server_time_ms, group_seq) = match sent {
                    Sent::New {
                        seq,
                        server_time_ms,
                    } => (true, server_time_ms, seq),
                    Sent::Duplicate {
                        seq,
                        server_time_ms,
                    } => {
                        groups
                            .metrics
                            .sends_duplicate
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        (false, server_time_ms, seq)
                    }
                };
                let ack = SendAck {
                    msg_id: s.msg_id,
                    status: SendStatus::Ok,
                    server_time_ms,
                    mismatched: vec![],
                    full_devices: vec![],
                    group_seq,
                };
                Ok((Frame::new(0, ack), new))
            }
            Body::GroupReceipt(r) => {
                let logged = groups.receipt(user, &r.group, r.kind, r.up_to_seq, now)?;
                Ok((Frame::new(0, ringpost_wire::Done {}), logged > 0))
            }
            _ => Err(GroupError::Malformed("not a group request")),
        }
    })
    .await;
    match result {
        Ok(Ok((frame, logged))) => {
            if logged {
                fanout::kick(server, group);
            }
            Answer::Frames(vec![frame])
        }
        Ok(Err(e)) => {
            server
                .groups
                .metrics
                .refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Answer::Error {
                code: e.code(),
                message: e.to_string(),
                retry_after_ms: 0,
            }
        }
        Err(e) => error(ErrorCode::Internal, &format!("group task failed: {e}")),
    }
}
