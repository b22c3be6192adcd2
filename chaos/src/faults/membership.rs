//! Membership faults, on a run with a cluster ([`crate::cluster`]): the coordinator leader
//! killed, a node joining, a node draining away, a node (or a whole zone) lost for good, a node
//! cut off from the coordinators (and, as `primary-partition`, from its peers too) and back, a
//! node restarted in turn, a replica slowed until its primaries drop it from their in-sync
//! sets.
//!
//! The faults of replicated runs that take a node out of its in-sync sets (`node-restart`,
//! `replica-lag`) check at their heal that it gets back into as many sets as it was in before
//! ([`REJOIN_TIMEOUT`]): that takes catch-up (docs/replication.md). A node that does not is a
//! finding ([`Rig::findings`]): it fails the run without stopping it, so the history is still
//! checked.
//!
//! Each step is written to the history as it happens ([`Event::Member`] for the nodes,
//! [`Event::Process`] for every process), and each fault's detail says how long the cluster
//! took to react (a new leader, a member active, a drain finished, a node marked down), which
//! the report shows.

use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::FaultKind;
use crate::history::{Event, MemberAction};
use crate::scenario::Rig;

/// Time a new leader may take after the old one was killed.
pub const LEADER_TIMEOUT: Duration = Duration::from_secs(20);

/// Time a restarted replica may take to agree with the others on the leader.
pub const REPLICA_CATCH_UP_TIMEOUT: Duration = Duration::from_secs(20);

/// Time a joining node may take to become an active member.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Time a drained node may take to hand its shards off and exit.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Time the coordinator may take to mark a killed node down (it takes
/// [`crate::cluster::HEARTBEAT_MISS_LIMIT`] missed heartbeats, 2 s).
pub const DOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// Time a removed or drained node may take to leave the view.
pub const LEAVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Time a node may take, after a fault that took it out of its in-sync sets healed, to be back
/// in as many as before (catch-up of every shard it missed writes of).
pub const REJOIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Time a slowed replica's primaries may take to drop it from at least one in-sync set: a write
/// waits `REPLICA_ACK_TIMEOUT_MS` (2 s) for it, then up to 2 s for the shrink to commit.
pub const LAG_DROP_TIMEOUT: Duration = Duration::from_secs(20);

/// How often the in-sync waits read the view.
const IN_SYNC_POLL: Duration = Duration::from_millis(200);

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

/// Applies a membership fault. Returns what was done (for the history).
pub(super) async fn apply(rig: &mut Rig, kind: &FaultKind) -> Result<String> {
    match kind {
        FaultKind::LeaderKill => kill_leader(rig).await,
        FaultKind::NodeJoin { node } => join(rig, *node).await,
        FaultKind::NodeDrain { node } => drain(rig, *node).await,
        FaultKind::NodeLoss { node, offline_ms } => {
            lose(rig, *node, Duration::from_millis(*offline_ms)).await
        }
        FaultKind::CoordPartition { node } => cut_from_coordinators(rig, *node, false).await,
        FaultKind::PrimaryPartition { node } => cut_from_coordinators(rig, *node, true).await,
        FaultKind::ZoneLoss { zone, offline_ms } => {
            let nodes = crate::cluster::zone_nodes(zone);
            if nodes.is_empty() {
                bail!("zone-loss: no zone {zone:?} in this run");
            }
            lose_all(rig, &nodes, Duration::from_millis(*offline_ms)).await
        }
        FaultKind::NodeRestart { node } => stop_until_down(rig, *node).await,
        FaultKind::ReplicaLag { node, delay_ms } => slow_replica(rig, *node, *delay_ms).await,
        other => bail!("{} is not a membership fault", other.name()),
    }
}

/// Heals a membership fault. Returns what was done.
pub(super) async fn heal(rig: &mut Rig, kind: &FaultKind) -> Result<String> {
    match kind {
        FaultKind::LeaderKill => restart_replicas(rig).await,
        // A join or a drain is done once applied; a lost node stays lost.
        FaultKind::NodeJoin { .. } | FaultKind::NodeDrain { .. } => Ok(String::new()),
        FaultKind::NodeLoss { node, .. } => Ok(format!("node {node} stays gone")),
        FaultKind::CoordPartition { node } => reconnect_to_coordinators(rig, *node, false).await,
        FaultKind::PrimaryPartition { node } => reconnect_to_coordinators(rig, *node, true).await,
        FaultKind::ZoneLoss { zone, .. } => Ok(format!("zone {zone} stays gone")),
        FaultKind::NodeRestart { node } => restart_and_rejoin(rig, *node).await,
        FaultKind::ReplicaLag { node, .. } => unslow_replica(rig, *node).await,
        other => bail!("{} is not a membership fault", other.name()),
    }
}

async fn kill_leader(rig: &mut Rig) -> Result<String> {
    let cluster = rig
        .cluster
        .as_mut()
        .context("leader-kill needs a cluster")?;
    let (leader, term) = cluster.wait_leader(LEADER_TIMEOUT).await?;
    let replica = cluster
        .replicas
        .iter_mut()
        .find(|r| r.spec.replica_id == leader)
        .with_context(|| format!("the leader {leader} is not one of the run's replicas"))?;
    let pid = replica.pid().unwrap_or(0);
    replica.kill9(&rig.net).await;
    rig.history.record(Event::Process {
        node: replica.spec.name.clone(),
        action: "kill".into(),
        pid,
        detail: format!("SIGKILL (coordinator leader, term {term})"),
    });
    let (new_leader, took) = cluster.wait_new_leader(leader, LEADER_TIMEOUT).await?;
    Ok(format!(
        "replica {leader} (leader in term {term}, pid {pid}) killed; replica {new_leader} led \
         after {} ms",
        ms(took)
    ))
}

async fn restart_replicas(rig: &mut Rig) -> Result<String> {
    let cluster = rig
        .cluster
        .as_mut()
        .context("leader-kill needs a cluster")?;
    let mut restarted = Vec::new();
    for replica in &mut cluster.replicas {
        if replica.is_running() {
            continue;
        }
        let pid = replica.start(&rig.net).await?;
        rig.history.record(Event::Process {
            node: replica.spec.name.clone(),
            action: "ready".into(),
            pid,
            detail: format!("start #{}", replica.starts),
        });
        restarted.push(replica.spec.replica_id);
    }
    let agreed = cluster.wait_all_agree(REPLICA_CATCH_UP_TIMEOUT).await?;
    let view = cluster.view().await?;
    let not_active: Vec<String> = view
        .members
        .iter()
        .filter(|m| m.state != "active")
        .map(|m| format!("node {} {}", m.info.node_id, m.state))
        .collect();
    let restarted: Vec<String> = restarted.iter().map(u64::to_string).collect();
    let mut detail = format!(
        "replica {} restarted; all replicas agreed on the leader after {} ms; view {}",
        restarted.join(", "),
        ms(agreed),
        view.describe()
    );
    if !not_active.is_empty() {
        detail.push_str(&format!(
            "; warning: {} (the leader change cost a node its membership)",
            not_active.join(", ")
        ));
    }
    Ok(detail)
}

/// Starts node `node_id` (a fresh data dir if it ran before: a drained node leaves nothing
/// worth keeping) and waits until it is an active member.
async fn join(rig: &mut Rig, node_id: u64) -> Result<String> {
    let index = rig.node_index(node_id)?;
    let mut fresh = String::new();
    if rig.nodes[index].starts > 0 {
        let n = rig.nodes[index].starts + 1;
        let dir = rig
            .run_dir
            .join(format!("{}-data-{n}", rig.nodes[index].spec.name));
        fresh = format!(", fresh data dir {}", dir.display());
        rig.nodes[index].spec.data_dir = dir;
    }
    let started = tokio::time::Instant::now();
    let pid = rig.start_member(index).await?;
    let ready = started.elapsed();
    let cluster = rig.cluster.as_ref().context("node-join needs a cluster")?;
    let (view, active) = cluster
        .wait_member(node_id, |s| s == Some("active"), JOIN_TIMEOUT)
        .await?;
    Ok(format!(
        "node {node_id} started (pid {pid}{fresh}), ready after {} ms, active {} ms later in \
         {}",
        ms(ready),
        ms(active),
        view.describe()
    ))
}

/// `ctl drain`, then waits for the node to hand everything off and exit 0.
async fn drain(rig: &mut Rig, node_id: u64) -> Result<String> {
    let index = rig.node_index(node_id)?;
    let cluster = rig.cluster.as_ref().context("node-drain needs a cluster")?;
    let started = tokio::time::Instant::now();
    cluster.ctl(&["drain", &node_id.to_string()]).await?;
    rig.member_event(node_id, MemberAction::Drain, "ctl drain");
    let pid = rig.nodes[index].pid().unwrap_or(0);
    let status = rig.nodes[index].wait_exit(&rig.net, DRAIN_TIMEOUT).await;
    let left = started.elapsed();
    let Some(status) = status else {
        bail!(
            "node {node_id} was still running {DRAIN_TIMEOUT:?} after `ctl drain`; see {}",
            rig.nodes[index].spec.log.display()
        );
    };
    rig.history.record(Event::Process {
        node: rig.nodes[index].spec.name.clone(),
        action: "exit".into(),
        pid,
        detail: status.to_string(),
    });
    if !status.success() {
        bail!(
            "node {node_id} exited with {status} after `ctl drain` (a drained node exits 0); \
             see {}",
            rig.nodes[index].spec.log.display()
        );
    }
    rig.member_event(node_id, MemberAction::Left, &status.to_string());
    let cluster = rig.cluster.as_ref().context("node-drain needs a cluster")?;
    let (view, _) = cluster
        .wait_member(node_id, |s| s.is_none(), LEAVE_TIMEOUT)
        .await?;
    Ok(format!(
        "ctl drain {node_id}: it handed its shards off and exited 0 after {} ms; view {}",
        ms(left),
        view.describe()
    ))
}

/// Cuts the node off from the client hosts for `offline` (namespaces only), then kill -9, no
/// restart; once the coordinator marks it down, `ctl remove` gives its data up.
async fn lose(rig: &mut Rig, node_id: u64, offline: Duration) -> Result<String> {
    lose_all(rig, &[node_id], offline).await
}

/// [`lose`] for several nodes at once (a zone): all cut off from the clients together, killed
/// one right after the other, then each marked down and removed.
async fn lose_all(rig: &mut Rig, node_ids: &[u64], offline: Duration) -> Result<String> {
    let mut indexes = Vec::new();
    let mut cuts = Vec::new();
    for &node_id in node_ids {
        let index = rig.node_index(node_id)?;
        indexes.push((node_id, index, rig.nodes[index].pid().unwrap_or(0)));
        cuts.push(cut_off_clients(rig, index).await?);
    }
    let cut = cuts.iter().all(|c| !c.is_empty());
    if cut {
        tokio::time::sleep(offline).await;
    }
    // What the in-sync sets were just before the kill: a set held only by the lost nodes has no
    // copy left to fail over to.
    let cluster = rig.cluster.as_ref().context("node-loss needs a cluster")?;
    let view = cluster.view().await?;
    let sets = in_sync_summary(&view, node_ids);
    let stranded = only_on(&view, node_ids);
    if node_ids.len() > 1 && stranded > 0 {
        // Zone-aware placement puts a copy in every zone: no set may be held by one zone alone.
        rig.findings.push(format!(
            "{stranded} in-sync sets were held only by the lost zone's nodes {node_ids:?} at \
             the kill: placement did not spread them over the zones"
        ));
    }
    let started = tokio::time::Instant::now();
    for &(node_id, index, pid) in &indexes {
        rig.nodes[index].kill9(&rig.net).await;
        rig.history.record(Event::Process {
            node: rig.nodes[index].spec.name.clone(),
            action: "kill".into(),
            pid,
            detail: "SIGKILL, not restarted".into(),
        });
        // Recorded once it is dead: nothing sent after this can have been stored on it.
        rig.member_event(node_id, MemberAction::Kill, &format!("SIGKILL pid {pid}"));
    }
    let mut steps = Vec::new();
    for &(node_id, _, pid) in &indexes {
        let cluster = rig.cluster.as_ref().context("node-loss needs a cluster")?;
        let (_, down) = cluster
            .wait_member(node_id, |s| s == Some("down"), DOWN_TIMEOUT)
            .await?;
        rig.member_event(
            node_id,
            MemberAction::Down,
            &format!("marked down {} ms after the kill", ms(down)),
        );
        steps.push(format!(
            "node {node_id} (pid {pid}) killed; marked down after {} ms",
            ms(down)
        ));
    }
    let mut view = None;
    for &(node_id, _, _) in &indexes {
        let cluster = rig.cluster.as_ref().context("node-loss needs a cluster")?;
        cluster.ctl(&["remove", &node_id.to_string()]).await?;
        let (v, _) = cluster
            .wait_member(node_id, |s| s.is_none(), LEAVE_TIMEOUT)
            .await?;
        view = Some(v);
        rig.member_event(
            node_id,
            MemberAction::Remove,
            &format!("ctl remove {node_id}: its unreplicated data is given up"),
        );
    }
    let removed = started.elapsed();
    let cut = if cut {
        format!("{} for {} ms", cuts.join("; "), ms(offline))
    } else {
        "not cut off from the clients first (no namespaces)".to_string()
    };
    let ids: Vec<String> = node_ids.iter().map(u64::to_string).collect();
    Ok(format!(
        "{cut}; in-sync sets at the kill: {sets}; {}; `ctl remove {}` done {} ms after the kill; \
         view {}",
        steps.join("; "),
        ids.join(", "),
        ms(removed),
        view.map_or_else(String::new, |v| v.describe())
    ))
}

/// How many in-sync sets are held only by nodes of `lost`.
fn only_on(view: &crate::cluster::View, lost: &[u64]) -> usize {
    view.in_sync_replicas
        .values()
        .filter(|set| set.iter().all(|n| lost.contains(n)))
        .count()
}

/// `N shards have a set (sizes: 1 x A, 2 x B), C held only by nodes [3, 4]: [12: [3, 4], ...]`.
pub fn in_sync_summary(view: &crate::cluster::View, lost: &[u64]) -> String {
    let mut sizes = std::collections::BTreeMap::<usize, usize>::new();
    let mut only_lost = Vec::new();
    for (shard, set) in &view.in_sync_replicas {
        *sizes.entry(set.len()).or_default() += 1;
        if set.iter().all(|n| lost.contains(n)) {
            only_lost.push(format!("{shard}: {set:?}"));
        }
    }
    let sizes: Vec<String> = sizes.iter().map(|(k, n)| format!("{k} x {n}")).collect();
    let listed: Vec<String> = only_lost.iter().take(8).cloned().collect();
    format!(
        "{} shards have one (sizes: {}), {} held only by nodes {lost:?}{}",
        view.in_sync_replicas.len(),
        sizes.join(", "),
        only_lost.len(),
        if listed.is_empty() {
            String::new()
        } else {
            format!(
                " ({}{})",
                listed.join(", "),
                if only_lost.len() > 8 { ", ..." } else { "" }
            )
        }
    )
}

/// Drops everything between node `index` and the client hosts (its peers and the
/// coordinators still reach it). The rules stay: the node never comes back, and its namespace
/// goes with the run. Returns what was done, empty without namespaces.
async fn cut_off_clients(rig: &mut Rig, index: usize) -> Result<String> {
    drop_hosts(rig, index, "client", "-I").await
}

/// Adds (`op` `-I`) or removes (`-D`) iptables DROP rules, both ways, in node `index`'s
/// namespace, between it and every host whose name starts with `prefix`. Returns what was
/// done, empty without namespaces.
async fn drop_hosts(rig: &mut Rig, index: usize, prefix: &str, op: &str) -> Result<String> {
    let host = rig.nodes[index].host.clone();
    if host.netns.is_none() {
        return Ok(String::new());
    }
    crate::sys::ensure_tool("iptables", "iptables").await?;
    let peers: Vec<String> = rig
        .net
        .hosts
        .iter()
        .filter(|h| h.name.starts_with(prefix))
        .map(|h| h.ip.to_string())
        .collect();
    for ip in &peers {
        super::iptables(&host, op, "INPUT", &super::source_rule(ip)).await?;
        super::iptables(&host, op, "OUTPUT", &super::dest_rule(ip)).await?;
    }
    let peers = peers.join(", ");
    Ok(if op == "-D" {
        format!("iptables DROP rules for {peers} removed in {}", host.name)
    } else {
        format!("iptables DROP {peers} both ways in {}", host.name)
    })
}

/// Cuts node `node_id` off from every coordinator replica (both ways; its clients still reach
/// it), and with `peers` from the other nodes' peer links too (its peer port, both ways), and
/// waits until the coordinator marks it down. The node keeps running: it must stop acking
/// writes once its lease runs out (it answers `WrongOwner`, retryable); cut from its peers
/// too, a replicating primary's replica writes time out and, without the coordinator, it can
/// drop no replica from an in-sync set, so it acks nothing more.
async fn cut_from_coordinators(rig: &mut Rig, node_id: u64, peers: bool) -> Result<String> {
    let index = rig.node_index(node_id)?;
    let pid = rig.nodes[index].pid().unwrap_or(0);
    let mut cut = drop_hosts(rig, index, "coord", "-I").await?;
    if cut.is_empty() {
        bail!("coord-partition needs network namespaces (root)");
    }
    if peers {
        cut.push_str(&format!(
            "; {}",
            super::cut_peer_link(rig, index, "-I").await?
        ));
    }
    let what = if peers {
        "the coordinators and its peers"
    } else {
        "the coordinators"
    };
    let cluster = rig
        .cluster
        .as_ref()
        .context("coord-partition needs a cluster")?;
    let (view, down) = cluster
        .wait_member(node_id, |s| s == Some("down"), DOWN_TIMEOUT)
        .await?;
    rig.member_event(
        node_id,
        MemberAction::Down,
        &format!(
            "marked down {} ms after it was cut off from {what} (still running, pid {pid})",
            ms(down)
        ),
    );
    Ok(format!(
        "{cut}; node {node_id} (pid {pid}) marked down after {} ms; view {}",
        ms(down),
        view.describe()
    ))
}

/// Heals [`cut_from_coordinators`]: removes the rules and waits until the node, heartbeating
/// again, is an active member (the same process, not restarted).
async fn reconnect_to_coordinators(rig: &mut Rig, node_id: u64, peers: bool) -> Result<String> {
    let index = rig.node_index(node_id)?;
    let pid = rig.nodes[index].pid().unwrap_or(0);
    let mut healed = drop_hosts(rig, index, "coord", "-D").await?;
    if peers {
        healed.push_str(&format!(
            "; {}",
            super::cut_peer_link(rig, index, "-D").await?
        ));
    }
    let cluster = rig
        .cluster
        .as_ref()
        .context("coord-partition needs a cluster")?;
    let (view, active) = cluster
        .wait_member(node_id, |s| s == Some("active"), JOIN_TIMEOUT)
        .await?;
    rig.member_event(
        node_id,
        MemberAction::Active,
        &format!(
            "active again {} ms after the partition healed (pid {pid})",
            ms(active)
        ),
    );
    Ok(format!(
        "{healed}; node {node_id} (pid {pid}) active again after {} ms; view {}; in-sync sets: \
         node {node_id} {}",
        ms(active),
        view.describe(),
        view.in_sync_of(node_id)
    ))
}

/// A rolling restart's step: SIGTERM node `node_id` and wait until the coordinator marks it
/// down (its shards fail over to their in-sync replicas). Restarted at the heal.
async fn stop_until_down(rig: &mut Rig, node_id: u64) -> Result<String> {
    let index = rig.node_index(node_id)?;
    let cluster = rig
        .cluster
        .as_ref()
        .context("node-restart needs a cluster")?;
    let before = cluster.view().await?.in_sync_of(node_id);
    rig.rejoin_before.insert(node_id, before);
    let pid = rig.nodes[index].pid().unwrap_or(0);
    rig.nodes[index].terminate(&rig.net).await;
    rig.history.record(Event::Process {
        node: rig.nodes[index].spec.name.clone(),
        action: "term".into(),
        pid,
        detail: "SIGTERM, restarted at the heal".into(),
    });
    let cluster = rig
        .cluster
        .as_ref()
        .context("node-restart needs a cluster")?;
    let (view, down) = cluster
        .wait_member(node_id, |s| s == Some("down"), DOWN_TIMEOUT)
        .await?;
    rig.member_event(
        node_id,
        MemberAction::Down,
        &format!("marked down {} ms after SIGTERM", ms(down)),
    );
    Ok(format!(
        "node {node_id} (pid {pid}, in-sync sets: {before}) stopped (SIGTERM); marked down \
         after {} ms; view {}",
        ms(down),
        view.describe()
    ))
}

/// Starts node `node_id` again on its data dir, waits until it is active, then until it is back
/// in as many in-sync sets as before the fault ([`wait_rejoin`]).
async fn restart_and_rejoin(rig: &mut Rig, node_id: u64) -> Result<String> {
    let index = rig.node_index(node_id)?;
    let pid = rig.start_member(index).await?;
    let cluster = rig
        .cluster
        .as_ref()
        .context("node-restart needs a cluster")?;
    let (view, active) = cluster
        .wait_member(node_id, |s| s == Some("active"), JOIN_TIMEOUT)
        .await?;
    let rejoin = wait_rejoin(rig, node_id).await?;
    Ok(format!(
        "node {node_id} restarted (pid {pid}) on its data dir, active after {} ms in {}; {rejoin}",
        ms(active),
        view.describe()
    ))
}

/// Node `node_id`'s peer address leads through the peer relay (set up for this fault): every
/// datagram between it and a node that dials it (a primary shipping records to it) is delayed
/// `delay_ms` each way, so a replica write takes longer than `REPLICA_ACK_TIMEOUT_MS`. Waits
/// until its primaries dropped it from at least one in-sync set.
async fn slow_replica(rig: &mut Rig, node_id: u64, delay_ms: u32) -> Result<String> {
    let cluster = rig
        .cluster
        .as_ref()
        .context("replica-lag needs a cluster")?;
    let before = cluster.view().await?.in_sync_of(node_id);
    rig.rejoin_before.insert(node_id, before);
    rig.peer_relay_set(crate::relay::Impairment {
        delay_ms,
        ..crate::relay::Impairment::default()
    })?;
    let started = tokio::time::Instant::now();
    let cluster = rig
        .cluster
        .as_ref()
        .context("replica-lag needs a cluster")?;
    loop {
        let now = cluster.view().await?.in_sync_of(node_id);
        if now.replica < before.replica {
            return Ok(format!(
                "peer relay delays node {node_id}'s links {delay_ms} ms each way; in-sync sets \
                 {before} before, {now} after {} ms",
                ms(started.elapsed())
            ));
        }
        if started.elapsed() >= LAG_DROP_TIMEOUT {
            bail!(
                "node {node_id}'s links delayed {delay_ms} ms each way, yet after \
                 {LAG_DROP_TIMEOUT:?} it is still a replica in as many in-sync sets ({before} \
                 before, {now} now): no primary dropped it"
            );
        }
        tokio::time::sleep(IN_SYNC_POLL).await;
    }
}

/// Heals [`slow_replica`]: the relay clean, then waits for the node to rejoin its sets.
async fn unslow_replica(rig: &mut Rig, node_id: u64) -> Result<String> {
    rig.peer_relay_set(crate::relay::Impairment::default())?;
    let rejoin = wait_rejoin(rig, node_id).await?;
    Ok(format!("peer relay clean; {rejoin}"))
}

/// Waits up to [`REJOIN_TIMEOUT`] until node `node_id` is in as many in-sync sets as before the
/// fault (as primary or replica: a restarted primary may come back as its shards' replica).
/// One that is not is a finding (it fails the run; the run goes on).
async fn wait_rejoin(rig: &mut Rig, node_id: u64) -> Result<String> {
    let before = rig.rejoin_before.remove(&node_id).unwrap_or_default();
    let started = tokio::time::Instant::now();
    let cluster = rig.cluster.as_ref().context("needs a cluster")?;
    loop {
        let now = cluster.view().await?.in_sync_of(node_id);
        if now.total() >= before.total() {
            return Ok(format!(
                "node {node_id} back in its in-sync sets after {} ms ({before} before, {now} \
                 now)",
                ms(started.elapsed())
            ));
        }
        if started.elapsed() >= REJOIN_TIMEOUT {
            let finding = format!(
                "node {node_id} did not rejoin its in-sync sets within {REJOIN_TIMEOUT:?} of the \
                 heal ({before} before the fault, {now} after): its shards kept fewer copies \
                 (catch-up, docs/replication.md)"
            );
            rig.findings.push(finding.clone());
            return Ok(finding);
        }
        tokio::time::sleep(IN_SYNC_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_sync_summaries_name_the_sets_only_lost_nodes_held() {
        let view: crate::cluster::View = serde_json::from_str(
            r#"{"epoch":5,"members":[],
                "in_sync_replicas":{"1":[1,3],"2":[3,4],"3":[4],"4":[2,1]}}"#,
        )
        .unwrap();
        assert_eq!(
            in_sync_summary(&view, &[3, 4]),
            "4 shards have one (sizes: 1 x 1, 2 x 3), 2 held only by nodes [3, 4] (2: [3, 4], \
             3: [4])"
        );
        assert_eq!(only_on(&view, &[3, 4]), 2);
        assert_eq!(only_on(&view, &[4]), 1);
        assert_eq!(only_on(&view, &[1, 2]), 1);
        assert_eq!(
            in_sync_summary(&view, &[2]),
            "4 shards have one (sizes: 1 x 1, 2 x 3), 0 held only by nodes [2]"
        );
    }
}
