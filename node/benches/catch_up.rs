//! Catch-up throughput: one shard of `SHARD_MIB` MiB (4 KiB rows, as inbox entries of large
//! messages) moved from a primary to an empty replica by the network sink, on RocksDB in
//! temporary directories. The link is in-process (each request encoded as a peer frame and
//! served by `serve_parts` on a blocking thread, as a replica node does), so this measures the
//! cut, the encoding, the replica's apply and its fsyncs, not the network.
//!
//! `cargo bench -p ringpost-node --bench catch_up`. Reports MiB/s; the time to move a 1 GiB
//! shard is 1024 / that (plus the network's share on a real link).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures::future::BoxFuture;
use ringpost_coordinator::NodeId;
use ringpost_node::peer::{encode_request, PeerRequest};
use ringpost_node::replication::sink::{CatchUpStats, REPLICA_ACK_TIMEOUT_MS};
use ringpost_node::replication::{
    serve_parts, NetworkSink, Reassembly, RecordPart, ReplicaLinks, ReplicatingEngine, ShardAnswer,
};
use ringpost_node::shard::ShardId;
use ringpost_node::storage::rocks::{RocksConfig, RocksEngine};
use ringpost_node::storage::{key, Cf, Engine, WriteBatch};

const SHARD: ShardId = 7;
const SHARD_MIB: usize = 64;
const ROW_BYTES: usize = 4096;

/// Node 2 is a follower of `SHARD` until it is caught up.
struct Links {
    replica: Arc<dyn Engine>,
    assembly: Arc<Mutex<Reassembly>>,
    done: Mutex<Option<CatchUpStats>>,
}

impl ReplicaLinks for Links {
    fn must_have(&self, _shard: ShardId) -> Vec<NodeId> {
        Vec::new()
    }

    fn followers(&self, shard: ShardId) -> Vec<NodeId> {
        if shard == SHARD && self.done.lock().unwrap().is_none() {
            vec![2]
        } else {
            Vec::new()
        }
    }

    fn catch_up_candidates(&self) -> Vec<(NodeId, ShardId)> {
        self.followers(SHARD)
            .into_iter()
            .map(|n| (n, SHARD))
            .collect()
    }

    fn may_catch_up(&self, node: NodeId, shard: ShardId) -> bool {
        self.followers(shard).contains(&node)
    }

    fn caught_up(&self, _node: NodeId, _shard: ShardId, stats: CatchUpStats) {
        *self.done.lock().unwrap() = Some(stats);
    }

    fn replicate(
        &self,
        _node: NodeId,
        parts: Vec<RecordPart>,
        _timeout: Duration,
    ) -> BoxFuture<'static, Result<Vec<ShardAnswer>, String>> {
        let frame = encode_request(1, PeerRequest::Replicate { parts });
        let engine = self.replica.clone();
        let assembly = self.assembly.clone();
        Box::pin(async move {
            let frame = frame?;
            let envelope: ringpost_node::peer::Envelope =
                postcard::from_bytes(&frame).map_err(|e| e.to_string())?;
            let PeerRequest::Replicate { parts } = envelope.request else {
                return Err("not a replicate request".into());
            };
            tokio::task::spawn_blocking(move || {
                let mut a = assembly.lock().unwrap();
                serve_parts(&*engine, &mut a, parts).answers
            })
            .await
            .map_err(|e| e.to_string())
        })
    }
}

fn open(dir: &tempfile::TempDir) -> Arc<dyn Engine> {
    Arc::new(RocksEngine::open(dir.path(), &RocksConfig::default()).expect("open rocksdb"))
}

fn catch_up(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let primary_dir = tempfile::tempdir().expect("tempdir");
    let replica_dir = tempfile::tempdir().expect("tempdir");
    let primary = open(&primary_dir);
    let replica = open(&replica_dir);
    let rows = SHARD_MIB * 1024 * 1024 / ROW_BYTES;
    for batch in 0..rows / 256 {
        let mut b = WriteBatch::new();
        for i in 0..256 {
            let n = (batch * 256 + i) as u64;
            b.put(
                Cf::Inbox,
                key(SHARD, &[&n.to_be_bytes()]),
                vec![n as u8; ROW_BYTES],
            );
        }
        primary.write(b, false).expect("fill");
    }
    primary.write(WriteBatch::new(), true).expect("sync");

    let mut group = c.benchmark_group("catch_up");
    group.sample_size(10);
    group.throughput(Throughput::Bytes((SHARD_MIB * 1024 * 1024) as u64));
    group.bench_function(format!("{SHARD_MIB}_mib_shard"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += runtime.block_on(async {
                    let links = Arc::new(Links {
                        replica: replica.clone(),
                        assembly: Arc::default(),
                        done: Mutex::new(None),
                    });
                    let sink = NetworkSink::new(
                        tokio::runtime::Handle::current(),
                        Duration::from_millis(REPLICA_ACK_TIMEOUT_MS),
                    );
                    sink.bind(links.clone());
                    let engine = Arc::new(ReplicatingEngine::new(primary.clone(), sink.clone(), 1));
                    let started = Instant::now();
                    sink.start_catch_up(Arc::downgrade(&engine));
                    loop {
                        if let Some(stats) = *links.done.lock().unwrap() {
                            // From the first cut, not from the scan's first tick.
                            return stats.elapsed.min(started.elapsed());
                        }
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                });
            }
            total
        });
    });
    group.finish();
}

criterion_group!(benches, catch_up);
criterion_main!(benches);
