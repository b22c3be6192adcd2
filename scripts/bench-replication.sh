#!/bin/bash
# Replication cost on a 3-node release cluster on loopback (issue 19): starts 3 coordinators and
# 3 nodes (--replicate true or false as asked, the factor set by ctl set-replication), registers the
# bench devices, waits for a quiet machine, then runs `ringpost-bench chat` over the 3 nodes and
# prints the nodes' CPU per delivered message (all 3 together). Needs the release binaries:
# cargo build --release -p ringpost-node -p ringpost-coordinator -p ringpost-bench
# usage: scripts/bench-replication.sh <label> <replicate:0|1> <rate msgs/s> <duration s> [factor]
set -u
LABEL=$1; REPL=$2; RATE=$3; DUR=$4; RF=${5:-2}
T=${CARGO_TARGET_DIR:-$HOME/.cache/ringpost-target}/release
D=${BENCH_DIR:-/tmp/ringpost-bench-replication}/$LABEL; rm -rf $D; mkdir -p $D
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > $D/secret; chmod 600 $D/secret
touch $D/codes
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM $p 2>/dev/null; done; wait 2>/dev/null; }
trap cleanup EXIT
coords=""
for i in 1 2 3; do
  $T/ringpost-coordinator run --replica-id $i --data-dir $D/coord$i --raft-listen 127.0.0.1:891$i --client-listen 127.0.0.1:890$i --admin-listen 127.0.0.1:892$i --secret-file $D/secret > $D/coord$i.log 2>&1 &
  pids+=($!); coords+="${coords:+,}127.0.0.1:890$i"
done
for a in $(seq 50); do $T/ringpost-coordinator init --coordinator $coords --secret-file $D/secret --shard-count 256 >> $D/init.log 2>&1 && break; sleep 0.2; done
$T/ringpost-coordinator ctl --coordinator $coords --secret-file $D/secret set-replication $RF > $D/ctl.log 2>&1 || cat $D/ctl.log
npids=()
for n in 1 2 3; do
  extra="--replicate false"; [[ $REPL == 1 ]] && extra="--replicate true"
  $T/ringpost-node run --data-dir $D/node$n --node-id $n --listen-ws 127.0.0.1:88${n}1 --listen-admin 127.0.0.1:88${n}8 --listen-peer 127.0.0.1:88${n}9 --coordinator $coords --cluster-secret-file $D/secret --shard-count 256 --codes-file $D/codes --device-rate 1000000 --device-burst 1000000 $extra > $D/node$n.out 2> $D/node$n.log &
  pids+=($!); npids+=($!)
  for a in $(seq 100); do grep -q "ringpost node ready" $D/node$n.out && break; sleep 0.2; done
done
sleep 2
while (( $(awk '{print ($1 < 0.5)}' /proc/loadavg) == 0 )); do sleep 5; done
echo "load before: $(cut -d' ' -f1 /proc/loadavg)"
cpu() { local t=0; for p in "${npids[@]}"; do s=$(awk '{print $14+$15}' /proc/$p/stat); t=$((t+s)); done; echo $t; }
$T/ringpost-bench chat --target ws://127.0.0.1:8811/ws --target ws://127.0.0.1:8821/ws --target ws://127.0.0.1:8831/ws --codes-file $D/codes --accounts $D/accounts.txt --pairs 300 --rate 1000 --duration 1 --quiet > $D/warm.out 2>&1
sleep 1
i0=$(cpu); sleep 10; i1=$(cpu); echo "idle ticks over 10 s (3 nodes): $((i1-i0))"
c0=$(cpu); t0=$(date +%s.%N)
$T/ringpost-bench chat --accounts $D/accounts.txt --target ws://127.0.0.1:8811/ws --target ws://127.0.0.1:8821/ws --target ws://127.0.0.1:8831/ws --codes-file $D/codes --pairs 300 --rate $RATE --duration $DUR --quiet --json $D/bench.json > $D/bench.out 2>&1
c1=$(cpu); t1=$(date +%s.%N)
python3 - "$D/bench.json" "$c0" "$c1" "$LABEL" <<'PY'
import json,sys
d=json.load(open(sys.argv[1])); c0,c1=int(sys.argv[2]),int(sys.argv[3])
r=d if 'delivered' in d or 'msgs_per_s' in d else d
def g(*ks):
    for k in ks:
        o=r
        try:
            for p in k.split('.'): o=o[p]
            return o
        except Exception: pass
    return None
print(sys.argv[4], {k:v for k,v in r.items() if not isinstance(v,(dict,list))})
lat=r.get('latency_ms') or r.get('send_to_deliver_ms') or {}
print('latency', lat if not isinstance(lat,list) else lat[:3])
msgs=r.get('cpu_window_messages') or 1
print('node cpu ticks (all 3 nodes):', c1-c0, 'us/msg (3 nodes together, incl. connect):', (c1-c0)*10000/msgs)
PY
