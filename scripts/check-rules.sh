#!/usr/bin/env bash
# Checks the Prometheus alert rules and the Grafana dashboard's queries (make check-rules; make
# test runs it). Needs promtool (Debian package `prometheus`, which scripts/deps.sh installs)
# and python3. Offline; starts no Prometheus.
#   1. promtool check rules deploy/prometheus/alerts.yml      (syntax, PromQL, templates)
#   2. promtool test rules deploy/prometheus/alerts_test.yml  (the rules' unit tests)
#   3. promtool check config deploy/prometheus/prometheus.yml (the example scrape config)
#   4. every query of deploy/grafana/ringpost.json, with Grafana's variables replaced by
#      example values, through promtool as a recording rule (so each one parses as PromQL).
# That every metric the rules and the dashboard name is really exported is checked by a test
# that starts a real node and real coordinators: node/tests/integration/cluster/observability.rs.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
prom="$root/deploy/prometheus"
dashboard="$root/deploy/grafana/ringpost.json"

if ! command -v promtool >/dev/null 2>&1; then
    echo "check-rules: promtool is missing; run scripts/deps.sh (or apt-get install prometheus)" >&2
    exit 1
fi

promtool check rules "$prom/alerts.yml"
(cd "$prom" && promtool test rules alerts_test.yml)
promtool check config --syntax-only "$prom/prometheus.yml"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 - "$dashboard" "$tmp/dashboard-rules.yml" <<'PY'
import json, sys

# Grafana's variables, as a user would have them: example values that keep PromQL valid.
values = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$node_job": "ringpost-node",
    "$coord_job": "ringpost-coordinator",
    "$node": ".*",
}

def exprs(x):
    if isinstance(x, dict):
        if isinstance(x.get("expr"), str):
            yield x["expr"]
        for v in x.values():
            yield from exprs(v)
    elif isinstance(x, list):
        for v in x:
            yield from exprs(v)

dashboard = json.load(open(sys.argv[1]))
found = list(exprs(dashboard.get("panels", [])))
if not found:
    sys.exit("check-rules: the dashboard has no queries")
with open(sys.argv[2], "w") as out:
    out.write("groups:\n  - name: dashboard\n    rules:\n")
    for i, e in enumerate(found):
        for k in sorted(values, key=len, reverse=True):
            e = e.replace(k, values[k])
        if "$" in e:
            sys.exit(f"check-rules: unknown Grafana variable in: {e}")
        out.write(f"      - record: dashboard:query_{i}\n        expr: {json.dumps(e)}\n")
print(f"check-rules: {len(found)} dashboard queries")
PY
promtool check rules "$tmp/dashboard-rules.yml"
echo "check-rules: ok"
