//! Membership faults, on a run with a cluster ([`crate::cluster`]): the coordinator leader
//! killed, a node joining, a node draining away, a node lost for good, a node cut off from
//! the coordinators (and back).
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
        FaultKind::CoordPartition { node } => cut_from_coordinators(rig, *node).await,
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
        FaultKind::CoordPartition { node } => reconnect_to_coordinators(rig, *node).await,
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
    let index = rig.node_index(node_id)?;
    let pid = rig.nodes[index].pid().unwrap_or(0);
    let cut = cut_off_clients(rig, index).await?;
    if !cut.is_empty() {
        tokio::time::sleep(offline).await;
    }
    let started = tokio::time::Instant::now();
    rig.nodes[index].kill9(&rig.net).await;
    rig.history.record(Event::Process {
        node: rig.nodes[index].spec.name.clone(),
        action: "kill".into(),
        pid,
        detail: "SIGKILL, not restarted".into(),
    });
    // Recorded once it is dead: nothing sent after this can have been stored on it.
    rig.member_event(node_id, MemberAction::Kill, &format!("SIGKILL pid {pid}"));
    let cluster = rig.cluster.as_ref().context("node-loss needs a cluster")?;
    let (_, down) = cluster
        .wait_member(node_id, |s| s == Some("down"), DOWN_TIMEOUT)
        .await?;
    rig.member_event(
        node_id,
        MemberAction::Down,
        &format!("marked down {} ms after the kill", ms(down)),
    );
    cluster.ctl(&["remove", &node_id.to_string()]).await?;
    let cluster = rig.cluster.as_ref().context("node-loss needs a cluster")?;
    let (view, _) = cluster
        .wait_member(node_id, |s| s.is_none(), LEAVE_TIMEOUT)
        .await?;
    let removed = started.elapsed();
    rig.member_event(
        node_id,
        MemberAction::Remove,
        &format!("ctl remove {node_id}: its unreplicated data is given up"),
    );
    let cut = if cut.is_empty() {
        "not cut off from the clients first (no namespaces)".to_string()
    } else {
        format!("{cut} for {} ms", ms(offline))
    };
    Ok(format!(
        "{cut}; node {node_id} (pid {pid}) killed; marked down after {} ms; `ctl remove \
         {node_id}` done {} ms after the kill; view {}",
        ms(down),
        ms(removed),
        view.describe()
    ))
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

/// Cuts node `node_id` off from every coordinator replica (both ways; its clients and peers
/// still reach it) and waits until the coordinator marks it down. The node keeps running: it
/// must stop acking writes once its lease runs out (it answers `WrongOwner`, retryable).
async fn cut_from_coordinators(rig: &mut Rig, node_id: u64) -> Result<String> {
    let index = rig.node_index(node_id)?;
    let pid = rig.nodes[index].pid().unwrap_or(0);
    let cut = drop_hosts(rig, index, "coord", "-I").await?;
    if cut.is_empty() {
        bail!("coord-partition needs network namespaces (root)");
    }
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
            "marked down {} ms after it was cut off from the coordinators (still running, pid \
             {pid})",
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
async fn reconnect_to_coordinators(rig: &mut Rig, node_id: u64) -> Result<String> {
    let index = rig.node_index(node_id)?;
    let pid = rig.nodes[index].pid().unwrap_or(0);
    let healed = drop_hosts(rig, index, "coord", "-D").await?;
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
        "{healed}; node {node_id} (pid {pid}) active again after {} ms; view {}",
        ms(active),
        view.describe()
    ))
}
