#!/usr/bin/env bash
# Offline checks of the deployment files (deploy/) and the Terraform (terraform/):
#   1. terraform fmt -check on all of terraform/;
#   2. init -backend=false, validate and test of each provider-free module (terraform/modules/*)
#      and of terraform/checks/render;
#   3. renders node.toml, coord.toml and the user-data's files through those modules;
#   4. systemd-analyze verify (any warning fails) and an exposure ceiling from
#      systemd-analyze security, on deploy/'s units and on the rendered EC2 ones;
#   5. the real binaries' `--check-config` on deploy/node.toml, deploy/coord.toml and the rendered
#      files (with the per-instance variables the user-data writes from a fake metadata service);
#   6. nft -c on the conntrack rules, and the sysctl keys against /proc/sys;
#   7. checkov on the AWS root module (terraform/), if installed; terraform validate of it if a
#      local provider mirror has the aws provider (TF_PLUGIN_MIRROR, default /opt/tf-plugins).
# `plan` and `apply` of the AWS root module need AWS: only where you deploy (docs/operations.md,
# "Deploying").
#
#   scripts/deploy-check.sh          # or: make check-deploy (builds the binaries first)
#   NODE_BIN=... COORD_BIN=...       # binaries (default $CARGO_TARGET_DIR/debug/)
#   CHECKOV=path/to/checkov          # default: checkov on PATH; skipped when absent
#   DEPLOY_CHECK_STRICT=1            # a skipped check (tool missing) fails the run
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
started=$(date +%s)
target="${CARGO_TARGET_DIR:-target}"
NODE_BIN="${NODE_BIN:-$target/debug/ringpost-node}"
COORD_BIN="${COORD_BIN:-$target/debug/ringpost-coordinator}"

work="$(mktemp -d "${TMPDIR:-/tmp}/ringpost-deploy-check.XXXXXX")"
imds_pid=""
cleanup() {
    [[ -n "$imds_pid" ]] && kill "$imds_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

checks=0
skipped=()
say() { echo "deploy-check: $*"; }
ok() { checks=$((checks + 1)); say "ok: $*"; }
skip() { skipped+=("$1"); say "SKIPPED: $1"; }
fail() { say "FAILED: $*" >&2; exit 1; }
# Runs "$@" quietly; on failure prints its output and fails with $what.
quiet() {
    local what="$1"; shift
    local out
    if ! out="$("$@" 2>&1)"; then
        echo "$out" >&2
        fail "$what"
    fi
}
is_root() { [[ "$(id -u)" == 0 ]]; }
apt_install() { # package: installs it when we are root on Debian
    is_root && command -v apt-get >/dev/null || return 1
    say "installing $1 (apt-get)"
    if [[ -z "${apt_updated:-}" ]]; then apt-get update -qq >/dev/null; apt_updated=1; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null
}

# ---- Terraform ------------------------------------------------------------------------------
have_terraform=""
if command -v terraform >/dev/null; then
    have_terraform=1
    # Nothing in the clone: data dirs and the CLI config under $work; no version check calls.
    export CHECKPOINT_DISABLE=1
    export TF_CLI_CONFIG_FILE="$work/terraformrc"
    printf 'disable_checkpoint = true\n' > "$TF_CLI_CONFIG_FILE"
    export TF_IN_AUTOMATION=1
    tf() { # dir args...
        local dir="$1"; shift
        TF_DATA_DIR="$work/tf-data/${dir//\//_}" terraform -chdir="$dir" "$@" -no-color
    }

    quiet "terraform fmt -check (run: terraform fmt -recursive terraform)" \
        terraform fmt -check -recursive -diff terraform
    ok "terraform fmt -check -recursive terraform ($(terraform version | head -1))"

    for dir in terraform/modules/*/ terraform/checks/render/; do
        dir="${dir%/}"
        quiet "terraform init in $dir" tf "$dir" init -backend=false -input=false
        quiet "terraform validate in $dir" tf "$dir" validate
        if compgen -G "$dir/tests/*.tftest.hcl" >/dev/null; then
            out="$(tf "$dir" test 2>&1)" || { echo "$out" >&2; fail "terraform test in $dir"; }
            ok "$dir: init, validate, test ($(echo "$out" | grep -E '^(Success|Failure)!' | tail -1))"
        else
            ok "$dir: init, validate"
        fi
    done

    # The AWS root module needs the aws provider: from a local filesystem mirror when the
    # machine has one (never the registry), in a copy so that no lock file lands in the clone.
    mirror="${TF_PLUGIN_MIRROR:-/opt/tf-plugins}"
    if compgen -G "$mirror/registry.terraform.io/hashicorp/aws/*" >/dev/null; then
        mkdir -p "$work/aws-tree"
        cp -r terraform deploy "$work/aws-tree/"
        quiet "terraform init of the AWS root module (plugin dir $mirror)" \
            tf "$work/aws-tree/terraform" init -backend=false -input=false -plugin-dir="$mirror"
        quiet "terraform validate of the AWS root module" tf "$work/aws-tree/terraform" validate
        ok "terraform/ (AWS root module): init and validate with the aws provider from $mirror ($(ls "$mirror/registry.terraform.io/hashicorp/aws" | tr '\n' ' ' | sed 's/ $//'))"
    else
        skip "terraform validate of the AWS root module (no aws provider in a local mirror, $mirror; the registry is unreachable here)"
    fi

    # Render: the check root has outputs only, so apply computes them without any provider.
    render=terraform/checks/render
    quiet "terraform apply of $render" tf "$render" apply -auto-approve -input=false -state="$work/render.tfstate"
    out() { TF_DATA_DIR="$work/tf-data/${render//\//_}" terraform -chdir="$render" output -no-color -state="$work/render.tfstate" "$@"; }
    mkdir -p "$work/rendered"
    out -raw node_toml > "$work/rendered/node.toml"
    out -raw coord_toml > "$work/rendered/coord.toml"
    out -json node_files > "$work/rendered/node_files.json"
    out -json coordinator_files > "$work/rendered/coordinator_files.json"
    out -raw node_cloud_config > "$work/rendered/node-cloud-config.yaml"
    # Each role's files as the instance would have them, under a root of its own.
    python3 - "$work" <<'EOF'
import json, os, sys
work = sys.argv[1]
for role in ("node", "coordinator"):
    for path, content in json.load(open(f"{work}/rendered/{role}_files.json")).items():
        dest = f"{work}/ec2-{role}{path}"
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with open(dest, "w") as f:
            f.write(content)
        if path.endswith(".sh"):
            os.chmod(dest, 0o755)
EOF
    ok "rendered node.toml, coord.toml and the user-data's files ($(out node_user_data_bytes) bytes of gzipped base64 user-data for a node)"

    # The cloud-config is YAML whose write_files are exactly those files.
    if python3 -c 'import yaml' 2>/dev/null; then
        python3 - "$work" <<'EOF' || fail "the node cloud-config"
import json, sys, yaml
work = sys.argv[1]
text = open(f"{work}/rendered/node-cloud-config.yaml").read()
assert text.startswith("#cloud-config\n"), "no #cloud-config line"
doc = yaml.safe_load(text)
files = {f["path"]: f["content"] for f in doc["write_files"]}
assert files == json.load(open(f"{work}/rendered/node_files.json")), "write_files differ"
assert doc["runcmd"] == [["/usr/local/lib/ringpost/install.sh"]], doc["runcmd"]
EOF
        ok "the node cloud-config parses as YAML and writes exactly the rendered files"
    else
        skip "cloud-config YAML parse (python3 has no yaml module: pip install pyyaml)"
    fi
else
    skip "terraform fmt, validate, test and rendering (terraform not installed; it is not in Debian or PyPI: install it from HashiCorp)"
fi

# ---- systemd units --------------------------------------------------------------------------
if ! command -v systemd-analyze >/dev/null; then
    apt_install systemd || true
fi
if command -v systemd-analyze >/dev/null; then
    # `verify` checks that ExecStart's binary exists and is executable, and finds the units a
    # unit needs (sysinit.target...): give it a root with the system's units, the units under
    # test and executable stand-ins for /usr/local/bin/ringpost-* and nft. The units stay as
    # they are installed.
    sysunits=/usr/lib/systemd/system
    [[ -d $sysunits ]] || sysunits=/lib/systemd/system
    make_root() { # dir
        mkdir -p "$1/usr/lib/systemd" "$1/usr/local/bin" "$1/usr/sbin" "$1/etc/systemd/system"
        cp -r "$sysunits" "$1/usr/lib/systemd/system"
        for exe in usr/local/bin/ringpost-node usr/local/bin/ringpost-coordinator usr/sbin/nft; do
            printf '#!/bin/sh\nexit 0\n' > "$1/$exe"
            chmod 0755 "$1/$exe"
        done
    }
    verify() { # root units...
        local r="$1"; shift
        local out
        out="$(systemd-analyze verify --root="$r" "$@" 2>&1)" || true
        # verify exits 0 on unknown keys and bad values; any line it prints is a finding.
        if [[ -n "$out" ]] || ! systemd-analyze verify --root="$r" "$@" >/dev/null 2>&1; then
            echo "$out" >&2
            fail "systemd-analyze verify ${*}"
        fi
        # Hardening must not slip: exposure at most 2.0 (of 10) per service unit.
        for u in "$@"; do
            [[ $u == ringpost-notrack.service ]] && continue
            if ! out="$(systemd-analyze security --offline=yes --root="$r" --threshold=20 "$u" 2>&1)"; then
                echo "$out" | tail -20 >&2
                fail "systemd-analyze security $u: exposure above 2.0"
            fi
        done
    }
    units=(ringpost-node.service ringpost-coordinator.service ringpost-notrack.service)
    make_root "$work/sd-bare"
    for u in "${units[@]}"; do cp "deploy/$u" "$work/sd-bare/etc/systemd/system/"; done
    verify "$work/sd-bare" "${units[@]}"
    ok "systemd-analyze verify and security: deploy/'s units ($(systemd-analyze security --offline=yes --root="$work/sd-bare" ringpost-node.service 2>&1 | grep -o 'exposure level for ringpost-node.service: [0-9.]*' | grep -o '[0-9.]*$') node, $(systemd-analyze security --offline=yes --root="$work/sd-bare" ringpost-coordinator.service 2>&1 | grep -o 'exposure level for ringpost-coordinator.service: [0-9.]*' | grep -o '[0-9.]*$') coordinator)"
    if [[ -n $have_terraform ]]; then
        make_root "$work/ec2-node"
        verify "$work/ec2-node" ringpost-node.service ringpost-notrack.service
        make_root "$work/ec2-coordinator"
        verify "$work/ec2-coordinator" ringpost-coordinator.service
        ok "systemd-analyze verify and security: the EC2 units as the user-data writes them (node with its 10-ec2.conf and 20-io-uring.conf drop-ins)"
    fi
else
    skip "systemd-analyze verify (systemd-analyze not installed: apt-get install systemd)"
fi

# ---- configuration files through the real binaries --------------------------------------------
for bin in "$NODE_BIN" "$COORD_BIN"; do
    [[ -x $bin ]] || fail "$bin is missing: build it first (cargo build --workspace --bins), or set NODE_BIN / COORD_BIN"
done
command -v openssl >/dev/null || apt_install openssl || fail "openssl is needed for a test certificate"
# The files the configurations name live under /etc/ringpost; the checks read stand-ins, given
# through the environment (which overrides the file, as on a real host).
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/cluster-secret"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=node.check \
    -keyout "$work/privkey.pem" -out "$work/fullchain.pem" 2>/dev/null
export RUST_BACKTRACE=0
node_check() { # config [env files...]
    local config="$1"; shift
    (
        set -a
        for f in "$@"; do . "$f"; done
        set +a
        exec env RINGPOST_CLUSTER_SECRET_FILE="$work/cluster-secret" \
            RINGPOST_TLS_CERT="$work/fullchain.pem" RINGPOST_TLS_KEY="$work/privkey.pem" \
            RINGPOST_DATA_DIR="$work/node-data" "$NODE_BIN" run --config "$config" --check-config
    )
}
coord_check() { # config
    RINGPOST_COORD_SECRET_FILE="$work/cluster-secret" RINGPOST_COORD_DATA_DIR="$work/coord-data" \
        "$COORD_BIN" run --config "$1" --check-config
}
quiet "ringpost-node --check-config deploy/node.toml" node_check deploy/node.toml
quiet "ringpost-coordinator --check-config deploy/coord.toml" coord_check deploy/coord.toml
# The check is not vacuous: a misspelt key and a bad value are refused.
cp deploy/node.toml "$work/bad-node.toml"; echo 'listen_wsss = "0.0.0.0:443"' >> "$work/bad-node.toml"
node_check "$work/bad-node.toml" >/dev/null 2>&1 && fail "ringpost-node accepted an unknown key"
cp deploy/coord.toml "$work/bad-coord.toml"; echo 'election_timeout_min_ms = 5000' >> "$work/bad-coord.toml"
coord_check "$work/bad-coord.toml" >/dev/null 2>&1 && fail "ringpost-coordinator accepted a bad election timeout"
[[ -e "$work/node-data" || -e "$work/coord-data" ]] && fail "--check-config created a data directory"
ok "deploy/node.toml and deploy/coord.toml pass the binaries' --check-config (and broken copies do not)"

if [[ -n $have_terraform ]]; then
    # The per-instance variables, as the drop-in's ExecStartPre writes them, from a fake
    # metadata service on loopback.
    coproc IMDS { exec python3 scripts/deploy-check/fake-imds.py; }
    imds_pid=$IMDS_PID
    read -r imds_port <&"${IMDS[0]}"
    IMDS_URL="http://127.0.0.1:$imds_port" "$work/ec2-node/usr/local/lib/ringpost/instance-env.sh" "$work/instance.env" \
        || fail "instance-env.sh against the fake metadata service"
    want_id=$(python3 -c 'print(int("0123456789abcdef0"[-15:], 16))')
    for line in "RINGPOST_NODE_ID=$want_id" RINGPOST_ZONE=eu-west-1b RINGPOST_LISTEN_ADMIN=10.0.102.17:7780 \
        RINGPOST_LISTEN_PEER=10.0.102.17:7790 RINGPOST_ADVERTISE_WSS=wss://n-203-0-113-7.nodes.chat.example \
        RINGPOST_ADVERTISE_QUIC=n-203-0-113-7.nodes.chat.example:443 RINGPOST_ADVERTISE_WS=ws://n-203-0-113-7.nodes.chat.example:80; do
        grep -qxF "$line" "$work/instance.env" || { cat "$work/instance.env" >&2; fail "instance.env lacks $line"; }
    done
    kill "$imds_pid" 2>/dev/null; imds_pid=""
    ok "instance-env.sh writes the node id, zone and addresses from the (fake) instance metadata"
    echo "RINGPOST_SMS_GATEWAY_TOKEN=deploy-check-token" > "$work/node.env"
    quiet "ringpost-node --check-config on the rendered node.toml" \
        node_check "$work/rendered/node.toml" "$work/node.env" "$work/instance.env"
    quiet "ringpost-coordinator --check-config on the rendered coord.toml" coord_check "$work/rendered/coord.toml"
    ok "the rendered node.toml (with node.env and instance.env) and coord.toml pass the binaries' --check-config"
fi

# ---- kernel: nft rules and sysctl keys -------------------------------------------------------
command -v nft >/dev/null || apt_install nftables || true
if command -v nft >/dev/null && nft -c -f deploy/ringpost-notrack.nft 2>"$work/nft.err"; then
    if [[ -n $have_terraform ]]; then
        quiet "nft -c on the rendered rules" nft -c -f "$work/ec2-node/etc/ringpost/ringpost-notrack.nft"
    fi
    ok "nft -c: deploy/ringpost-notrack.nft${have_terraform:+ and the rendered copy}"
elif command -v nft >/dev/null && grep -q "Operation not permitted" "$work/nft.err"; then
    skip "nft -c (needs root: CAP_NET_ADMIN)"
elif command -v nft >/dev/null; then
    cat "$work/nft.err" >&2
    fail "nft -c -f deploy/ringpost-notrack.nft"
else
    skip "nft -c (nft not installed: apt-get install nftables)"
fi
unknown=()
while read -r key; do
    [[ -e /proc/sys/${key//.//} ]] || unknown+=("$key")
done < <(sed -n 's/^\([a-z0-9_.]*\) *=.*/\1/p' deploy/90-ringpost.conf)
((${#unknown[@]} == 0)) || fail "deploy/90-ringpost.conf: keys this kernel does not have: ${unknown[*]}"
ok "deploy/90-ringpost.conf: every key exists in /proc/sys"

# ---- checkov on the AWS root module ----------------------------------------------------------
checkov="${CHECKOV:-checkov}"
if command -v "$checkov" >/dev/null; then
    # --skip-download: no calls to the vendor's API; in an empty network namespace when we can
    # make one, so that nothing leaves the machine whatever the version does.
    runner=()
    is_root && command -v unshare >/dev/null && unshare -n true 2>/dev/null && runner=(unshare -n)
    "${runner[@]}" "$checkov" -d terraform --framework terraform --skip-path modules --skip-path checks \
        --skip-download --compact -o json > "$work/checkov.json" 2>"$work/checkov.err" || true
    python3 - "$work/checkov.json" <<'EOF' || { cat "$work/checkov.err" >&2; fail "checkov"; }
import json, sys
d = json.load(open(sys.argv[1]))
d = d[0] if isinstance(d, list) else d
s = d["summary"]
for r in d["results"].get("failed_checks", []):
    print(f"  failed: {r['check_id']} {r['resource']}: {r['check_name']}", file=sys.stderr)
for r in d["results"].get("skipped_checks", []):
    print(f"  baselined: {r['check_id']} {r['resource']}: {r['check_result'].get('suppress_comment', '')}")
print(f"  checkov {s['checkov_version']}: {s['passed']} passed, {s['failed']} failed, {s['skipped']} baselined, {s['parsing_errors']} parsing errors")
sys.exit(1 if s["failed"] or s["parsing_errors"] else 0)
EOF
    ok "checkov on terraform/ (baseline: the #checkov:skip lines, each with its reason)"
else
    skip "checkov (not installed: pip install checkov==3.3.30, about 75 s; or CHECKOV=path)"
fi

elapsed=$(($(date +%s) - started))
if ((${#skipped[@]})); then
    say "$checks checks passed, ${#skipped[@]} skipped in ${elapsed}s:"
    for s in "${skipped[@]}"; do say "  skipped: $s"; done
    [[ -z ${DEPLOY_CHECK_STRICT:-} ]] || fail "DEPLOY_CHECK_STRICT is set and checks were skipped"
else
    say "$checks checks passed in ${elapsed}s"
fi
