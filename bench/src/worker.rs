//! Workers: where connections live. A run is split over one or more workers, each holding a
//! slice of the accounts and one source address; the parent steps them through the scenario's
//! phases and merges what they report.
//!
//! A worker is either a task in the parent process (small runs) or a child process (the parent
//! re-executes itself as the hidden `worker` subcommand): the open-file limit here is 20000 per
//! process and cannot be raised, so above [`CONNECTIONS_PER_PROCESS_MAX`] connections the run
//! is spread over processes. Both speak the same messages, as JSON lines over the child's
//! stdin and stdout or over channels in process, so the scenario code does not know which it
//! runs in.
//!
//! A child exits as soon as its stdin closes, so a parent that dies (or is killed) takes its
//! workers with it.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

use crate::accounts::{parse_cache, Account};
use crate::loadclient::peer::PeerProtocol;
use crate::loadclient::sdk::SdkConnector;
use crate::loadclient::{ClientKind, Connector, Dialer, Transport};
use crate::scenario;

/// Connections one process holds at most: the open-file limit (20000 here) less room for the
/// runtime, the node's pipes and files, and QUIC sockets.
pub const CONNECTIONS_PER_PROCESS_MAX: usize = 18_000;

/// How often a worker reports progress while connecting or sending.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);

/// Everything a worker needs; sent as the first line of a child's stdin.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    pub index: usize,
    pub transport: Transport,
    /// A peer broker instead of Ringpost (`compare`); `targets` then holds its `ip:port`.
    pub peer: Option<PeerProtocol>,
    /// Lean client or SDK for Ringpost devices.
    pub client: ClientKind,
    pub targets: Vec<String>,
    pub ca_file: Option<PathBuf>,
    /// Source address of every connection this worker opens; `None`: the kernel's choice.
    pub source_ip: Option<IpAddr>,
    /// Connection attempts in flight at once (TCP, TLS, WebSocket and `Hello`).
    pub connect_concurrency: usize,
    /// This worker's accounts, as cache-file lines.
    pub accounts: Vec<String>,
    pub scenario: scenario::Spec,
}

/// Parent to worker.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Down {
    /// Start the next phase.
    Go,
}

/// Worker to parent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Up {
    /// Work units done so far in the current phase, and errors.
    Progress { done: u64, errors: u64 },
    /// A phase is complete; the worker waits for [`Down::Go`].
    Phase { name: String, data: Value },
    /// The worker is done; its final figures.
    Done { data: Value },
    /// The worker failed.
    Failed { error: String },
}

/// A worker's side of the conversation.
pub struct WorkerCtx {
    pub spec: WorkerSpec,
    pub connector: Arc<Connector>,
    pub accounts: Vec<Account>,
    up: mpsc::UnboundedSender<Up>,
    down: mpsc::UnboundedReceiver<Down>,
}

impl WorkerCtx {
    pub fn progress(&self, done: u64, errors: u64) {
        let _ = self.up.send(Up::Progress { done, errors });
    }

    /// Reports the end of phase `name` and waits for the parent's go-ahead.
    pub async fn phase(&mut self, name: &str, data: Value) -> Result<()> {
        let _ = self.up.send(Up::Phase {
            name: name.to_string(),
            data,
        });
        match self.down.recv().await {
            Some(Down::Go) => Ok(()),
            None => bail!("the parent went away"),
        }
    }
}

/// Runs one worker to the end, reporting on `up`.
pub async fn run(
    spec: WorkerSpec,
    up: mpsc::UnboundedSender<Up>,
    down: mpsc::UnboundedReceiver<Down>,
) {
    let result = async {
        let accounts = parse_cache(&spec.accounts.join("\n"))?;
        let connector = match spec.peer {
            None if spec.client == ClientKind::Sdk => Connector::Sdk(SdkConnector::new(
                spec.targets.clone(),
                spec.ca_file.clone(),
            )),
            None => Connector::Ringpost(
                Dialer::new(
                    spec.transport,
                    &spec.targets,
                    spec.ca_file.as_deref(),
                    spec.source_ip,
                )
                .await?,
            ),
            Some(protocol) => {
                let target = spec
                    .targets
                    .first()
                    .ok_or_else(|| anyhow!("no broker address"))?;
                Connector::Peer {
                    protocol,
                    addr: target
                        .parse()
                        .with_context(|| format!("broker address {target}"))?,
                    source: spec.source_ip,
                }
            }
        };
        let mut ctx = WorkerCtx {
            spec,
            connector: Arc::new(connector),
            accounts,
            up: up.clone(),
            down,
        };
        scenario::worker(&mut ctx).await
    }
    .await;
    let _ = match result {
        Ok(data) => up.send(Up::Done { data }),
        Err(e) => up.send(Up::Failed {
            error: format!("{e:#}"),
        }),
    };
}

/// The hidden `worker` subcommand: the spec on stdin's first line, [`Down`] lines after it,
/// [`Up`] lines on stdout. Exits when stdin closes.
pub async fn child_main() -> Result<()> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let first = lines
        .next_line()
        .await?
        .ok_or_else(|| anyhow!("no worker spec on stdin"))?;
    let spec: WorkerSpec = serde_json::from_str(&first).context("worker spec")?;
    let (up_tx, mut up_rx) = mpsc::unbounded_channel();
    let (down_tx, down_rx) = mpsc::unbounded_channel();
    let (gone_tx, gone_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        loop {
            match lines.next_line().await {
                Ok(Some(line)) => {
                    if let Ok(d) = serde_json::from_str::<Down>(&line) {
                        let _ = down_tx.send(d);
                    }
                }
                _ => {
                    let _ = gone_tx.send(());
                    break;
                }
            }
        }
    });
    tokio::spawn(run(spec, up_tx, down_rx));
    let forward = async {
        let mut stdout = tokio::io::stdout();
        while let Some(msg) = up_rx.recv().await {
            let last = matches!(msg, Up::Done { .. } | Up::Failed { .. });
            let mut line = serde_json::to_string(&msg)?;
            line.push('\n');
            stdout.write_all(line.as_bytes()).await?;
            stdout.flush().await?;
            if last {
                break;
            }
        }
        Ok::<_, anyhow::Error>(())
    };
    // The parent is gone: return, and the runtime's shutdown drops every connection.
    tokio::select! {
        r = forward => r,
        _ = gone_rx => bail!("the parent closed our stdin"),
    }
}

/// The parent's handle on one worker.
struct Handle {
    up: mpsc::UnboundedReceiver<Up>,
    down: mpsc::UnboundedSender<Down>,
    /// Killed on drop.
    _child: Option<tokio::process::Child>,
    pid: Option<u32>,
    done: u64,
    errors: u64,
}

/// The phase name [`Fleet::wait`] takes for a worker's final report.
pub const DONE: &str = "done";

/// Every worker of a run.
pub struct Fleet {
    workers: Vec<Handle>,
}

impl Fleet {
    /// Starts one worker per spec: in this process when `in_process`, else as child processes.
    pub async fn start(specs: Vec<WorkerSpec>, in_process: bool) -> Result<Fleet> {
        let mut workers = Vec::with_capacity(specs.len());
        for spec in specs {
            let (up_tx, up_rx) = mpsc::unbounded_channel();
            let (down_tx, down_rx) = mpsc::unbounded_channel();
            if in_process {
                tokio::spawn(run(spec, up_tx, down_rx));
                workers.push(Handle {
                    up: up_rx,
                    down: down_tx,
                    _child: None,
                    pid: None,
                    done: 0,
                    errors: 0,
                });
                continue;
            }
            let exe = std::env::current_exe().context("find own executable")?;
            let mut child = tokio::process::Command::new(exe)
                .arg("worker")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .context("start worker process")?;
            let pid = child.id();
            let mut stdin = child.stdin.take().ok_or_else(|| anyhow!("worker stdin"))?;
            let stdout = child
                .stdout
                .take()
                .ok_or_else(|| anyhow!("worker stdout"))?;
            let mut first = serde_json::to_string(&spec)?;
            first.push('\n');
            stdin.write_all(first.as_bytes()).await?;
            let mut down_rx = down_rx;
            tokio::spawn(async move {
                while let Some(d) = down_rx.recv().await {
                    let Ok(mut line) = serde_json::to_string(&d) else {
                        break;
                    };
                    line.push('\n');
                    if stdin.write_all(line.as_bytes()).await.is_err() {
                        break;
                    }
                }
                // Dropping stdin tells the worker to exit.
            });
            let index = spec.index;
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                loop {
                    match lines.next_line().await {
                        Ok(Some(line)) => match serde_json::from_str::<Up>(&line) {
                            Ok(msg) => {
                                if up_tx.send(msg).is_err() {
                                    break;
                                }
                            }
                            Err(e) => {
                                let _ = up_tx.send(Up::Failed {
                                    error: format!("worker {index} said {line:?}: {e}"),
                                });
                                break;
                            }
                        },
                        _ => {
                            let _ = up_tx.send(Up::Failed {
                                error: format!("worker {index} exited"),
                            });
                            break;
                        }
                    }
                }
            });
            workers.push(Handle {
                up: up_rx,
                down: down_tx,
                _child: Some(child),
                pid,
                done: 0,
                errors: 0,
            });
        }
        Ok(Fleet { workers })
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// Process ids of child workers (none for in-process ones).
    pub fn pids(&self) -> Vec<u32> {
        self.workers.iter().filter_map(|w| w.pid).collect()
    }

    /// Waits until every worker reported phase `name` (or finished, with `name` "done"),
    /// calling `progress(done, errors)` with the sums as they come. Returns each worker's data.
    pub async fn wait(&mut self, name: &str, progress: &dyn Fn(u64, u64)) -> Result<Vec<Value>> {
        for w in &mut self.workers {
            w.done = 0;
            w.errors = 0;
        }
        let mut out: Vec<Option<Value>> = vec![None; self.workers.len()];
        while out.iter().any(Option::is_none) {
            let mut changed = false;
            for (i, w) in self.workers.iter_mut().enumerate() {
                if out[i].is_some() {
                    continue;
                }
                while let Ok(msg) = w.up.try_recv() {
                    match msg {
                        Up::Progress { done, errors } => {
                            w.done = done;
                            w.errors = errors;
                            changed = true;
                        }
                        Up::Phase { name: got, data } if got == name => {
                            out[i] = Some(data);
                            break;
                        }
                        Up::Done { data } if name == DONE => {
                            out[i] = Some(data);
                            break;
                        }
                        Up::Phase { name: got, .. } => {
                            bail!("worker {i} reported phase {got}, expected {name}")
                        }
                        Up::Done { .. } => {
                            bail!("worker {i} finished early, expected phase {name}")
                        }
                        Up::Failed { error } => bail!("worker {i}: {error}"),
                    }
                }
            }
            if changed {
                let done = self.workers.iter().map(|w| w.done).sum();
                let errors = self.workers.iter().map(|w| w.errors).sum();
                progress(done, errors);
            }
            if out.iter().any(Option::is_none) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// Lets every worker start its next phase.
    pub fn go(&self) {
        for w in &self.workers {
            let _ = w.down.send(Down::Go);
        }
    }
}
