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

# uv for the setup tests, in a venv of its own; only the uv binary goes on PATH (the venv's
# python3 must not shadow the system one).
TOOLS="${RUNCTL_TOOLS_DIR:-$HOME/.cache/runctl-tools}"
if [ ! -x "$TOOLS/bin/uv" ]; then
    echo "== installing uv into $TOOLS"
    python3 -m venv "$TOOLS/venv"
    "$TOOLS/venv/bin/pip" install --quiet --disable-pip-version-check uv
    mkdir -p "$TOOLS/bin"
    ln -sf "$TOOLS/venv/bin/uv" "$TOOLS/bin/uv"
fi
export PATH="$TOOLS/bin:$PATH"

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo build (binaries the end-to-end tests drive)"
cargo build --workspace --bins --locked
echo "== cargo test"
cargo test --workspace --locked
