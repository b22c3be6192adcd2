#!/usr/bin/env bash
# A local cluster on loopback: 3 coordinator replicas and 3 nodes, each a real process with
# its own data directory under $CLUSTER_DIR. Prints every address; Ctrl-C stops everything.
#
#   scripts/cluster.sh            # or: make cluster
#   CLUSTER_DIR=/tmp/c NODES=4 scripts/cluster.sh
#   PROFILE=release scripts/cluster.sh    # optimised binaries (for benchmarks)
#
# Ports (loopback only): coordinators 7901-7903 (clients), 7911-7913 (raft) and 7921-7923
# (admin: /metrics); node N
# listens on ws 77N1... see the table it prints. A second run reuses the data directories
# (the cluster is initialised once).
set -euo pipefail

CARGO=${CARGO:-cargo}
CLUSTER_DIR=${CLUSTER_DIR:-./data/cluster}
NODES=${NODES:-3}
SHARDS=${SHARDS:-4096}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
PROFILE=${PROFILE:-debug}

case "$PROFILE" in
    debug) "$CARGO" build -q -p ringpost-node -p ringpost-coordinator --bins ;;
    release) "$CARGO" build -q --release -p ringpost-node -p ringpost-coordinator --bins ;;
    *) echo "PROFILE must be debug or release, not $PROFILE" >&2; exit 2 ;;
esac
COORD="$TARGET_DIR/$PROFILE/ringpost-coordinator"
NODE="$TARGET_DIR/$PROFILE/ringpost-node"

mkdir -p "$CLUSTER_DIR"
SECRET_FILE="$CLUSTER_DIR/secret"
if [[ ! -s "$SECRET_FILE" ]]; then
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$SECRET_FILE"
    chmod 600 "$SECRET_FILE"
fi
CODES="$CLUSTER_DIR/verification-codes.txt"
touch "$CODES"

pids=()
stop() {
    trap - INT TERM EXIT
    echo
    echo "stopping the cluster"
    # Nodes first (graceful: clients get GoingAway), then the coordinators.
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap stop INT TERM EXIT

coordinators=""
for i in 1 2 3; do
    "$COORD" run --replica-id "$i" --data-dir "$CLUSTER_DIR/coord$i" \
        --raft-listen "127.0.0.1:791$i" --client-listen "127.0.0.1:790$i" \
        --admin-listen "127.0.0.1:792$i" \
        --secret-file "$SECRET_FILE" >"$CLUSTER_DIR/coord$i.log" 2>&1 &
    pids+=($!)
    coordinators+="${coordinators:+,}127.0.0.1:790$i"
done
# Initialise once (the replicas need a moment to listen); a later run reuses the cluster.
if [[ ! -e "$CLUSTER_DIR/initialized" ]]; then
    for attempt in $(seq 50); do
        if "$COORD" init --coordinator "$coordinators" --secret-file "$SECRET_FILE" \
            --shard-count "$SHARDS" >>"$CLUSTER_DIR/init.log" 2>&1; then
            touch "$CLUSTER_DIR/initialized"
            break
        fi
        [[ $attempt == 50 ]] && { echo "init failed; see $CLUSTER_DIR/init.log" >&2; exit 1; }
        sleep 0.2
    done
fi

for n in $(seq "$NODES"); do
    "$NODE" run --data-dir "$CLUSTER_DIR/node$n" --node-id "$n" \
        --listen-ws "127.0.0.1:77${n}1" --listen-admin "127.0.0.1:77${n}8" \
        --listen-peer "127.0.0.1:77${n}9" \
        --coordinator "$coordinators" --cluster-secret-file "$SECRET_FILE" \
        --shard-count "$SHARDS" --codes-file "$CODES" \
        >"$CLUSTER_DIR/node$n.out" 2>"$CLUSTER_DIR/node$n.log" &
    pids+=($!)
done
for n in $(seq "$NODES"); do
    for _ in $(seq 300); do
        grep -q "ringpost node ready" "$CLUSTER_DIR/node$n.out" 2>/dev/null && break
        if ! kill -0 "${pids[$((n + 2))]}" 2>/dev/null; then
            echo "node $n exited; its log: $CLUSTER_DIR/node$n.log" >&2
            tail -20 "$CLUSTER_DIR/node$n.log" >&2
            exit 1
        fi
        sleep 0.1
    done
done

echo "ringpost cluster up (data and logs in $CLUSTER_DIR)"
echo "  coordinators (client API): $coordinators"
echo "    metrics: http://127.0.0.1:7921/metrics http://127.0.0.1:7922/metrics http://127.0.0.1:7923/metrics"
echo "    ctl: $COORD ctl --coordinator $coordinators --secret-file $SECRET_FILE status|members|drain N|remove N"
for n in $(seq "$NODES"); do
    echo "  node $n: ws://127.0.0.1:77${n}1  admin http://127.0.0.1:77${n}8  peer 127.0.0.1:77${n}9"
done
echo "  verification codes: $CODES"
echo "Ctrl-C stops the cluster"
wait -n "${pids[@]}" || true
echo "a process of the cluster exited; see the logs in $CLUSTER_DIR" >&2
