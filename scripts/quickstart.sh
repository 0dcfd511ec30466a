#!/usr/bin/env bash
# Builds runctl and runs the quickstart training script on the embedded default: the
# local provider (an agent process on this machine, reached over QUIC on loopback). No
# cloud account needed. State goes to $RUNCTL_HOME (default ~/.runctl).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/runctl-target}"
cargo build --workspace --bins --locked --quiet
exec "$CARGO_TARGET_DIR/debug/runctl-controller" run --workdir examples/quickstart -- python3 train.py "$@"
