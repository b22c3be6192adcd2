//! Inbox append throughput on RocksDB in a temporary directory, every group commit a synced
//! WAL write. Two shapes: many concurrent senders (group commit at work) and one sender at a
//! time (one fsync per append: the baseline group commit is measured against).
//!
//! `cargo bench -p ringpost-node --bench inbox` (release: the first run compiles RocksDB for
//! that profile). Prints the mean group size after each shape.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ringpost_node::inbox::{Append, AppendOutcome, Entry, Inbox, InboxConfig};
use ringpost_node::storage::rocks::{RocksConfig, RocksEngine};
use ringpost_node::storage::Engine;

/// Tasks appending at once in the concurrent shape.
const SENDERS: usize = 256;
/// Appends per measured iteration of the concurrent shape.
const APPENDS_PER_ITER: usize = 1024;
/// Appends per measured iteration of the one-sender shape (each waits for its own fsync).
const SERIAL_APPENDS_PER_ITER: usize = 32;
/// Recipients the appends are spread over, so no device nears its quota.
const RECIPIENTS: u64 = 10_000;
/// Ciphertext bytes per device copy; two devices per append.
const BODY_BYTES: usize = 200;

struct Fixture {
    inbox: Inbox,
    commits: Arc<AtomicU64>,
    grouped: Arc<AtomicU64>,
    next_msg: Arc<AtomicU64>,
    _dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine: Arc<dyn Engine> =
        Arc::new(RocksEngine::open(dir.path(), &RocksConfig::default()).expect("open rocksdb"));
    let commits = Arc::new(AtomicU64::new(0));
    let grouped = Arc::new(AtomicU64::new(0));
    let (c, g) = (Arc::clone(&commits), Arc::clone(&grouped));
    let observer = Arc::new(move |_latency: Duration, requests: usize| {
        c.fetch_add(1, Ordering::Relaxed);
        g.fetch_add(requests as u64, Ordering::Relaxed);
    });
    let config = InboxConfig {
        observer: Some(observer),
        ..InboxConfig::default()
    };
    let inbox = Inbox::start(engine, config).expect("start inbox");
    Fixture {
        inbox,
        commits,
        grouped,
        next_msg: Arc::new(AtomicU64::new(0)),
        _dir: dir,
    }
}

/// One message from a unique (sender, msg_id) to two devices of a recipient.
async fn append_one(inbox: &Inbox, next_msg: &AtomicU64, body: &Bytes) {
    let n = next_msg.fetch_add(1, Ordering::Relaxed);
    let (from, to) = (1_000_000 + n % 977, n % RECIPIENTS);
    let mut msg_id = [0u8; 16];
    msg_id[..8].copy_from_slice(&n.to_be_bytes());
    let entry = Entry::message(from, 1, msg_id, body.clone());
    let append = Append {
        to_user: to,
        dedup: Some((from, 1, msg_id)),
        entries: vec![(1, entry.clone()), (2, entry)],
        now_ms: 1_700_000_000_000 + n,
    };
    match inbox.append(append).await {
        Ok(AppendOutcome::Stored { .. }) => {}
        other => panic!("append failed: {other:?}"),
    }
}

fn report(name: &str, f: &Fixture) {
    let commits = f.commits.load(Ordering::Relaxed).max(1);
    let grouped = f.grouped.load(Ordering::Relaxed);
    eprintln!(
        "{name}: {grouped} appends in {commits} commits, {:.1} per group",
        grouped as f64 / commits as f64
    );
}

fn append_throughput(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let body = Bytes::from(vec![0xab; BODY_BYTES]);
    let mut group = c.benchmark_group("inbox_append_rocksdb");
    group.sample_size(20);

    let f = fixture();
    group.throughput(Throughput::Elements(APPENDS_PER_ITER as u64));
    group.bench_function("256_concurrent_senders", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    let mut tasks = tokio::task::JoinSet::new();
                    for _ in 0..SENDERS {
                        let (inbox, next, body) =
                            (f.inbox.clone(), Arc::clone(&f.next_msg), body.clone());
                        tasks.spawn(async move {
                            for _ in 0..APPENDS_PER_ITER / SENDERS {
                                append_one(&inbox, &next, &body).await;
                            }
                        });
                    }
                    while let Some(done) = tasks.join_next().await {
                        done.expect("sender task");
                    }
                }
                started.elapsed()
            })
        })
    });
    report("256_concurrent_senders", &f);
    drop(f);

    let f = fixture();
    group.throughput(Throughput::Elements(SERIAL_APPENDS_PER_ITER as u64));
    group.bench_function("1_sender", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let started = Instant::now();
                for _ in 0..iters * SERIAL_APPENDS_PER_ITER as u64 {
                    append_one(&f.inbox, &f.next_msg, &body).await;
                }
                started.elapsed()
            })
        })
    });
    report("1_sender", &f);
    group.finish();
}

criterion_group!(benches, append_throughput);
criterion_main!(benches);
