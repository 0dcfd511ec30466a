#!/usr/bin/env bash
# Builds the runctl-agent that EC2 instances (and RunPod pods) run: a fully static x86_64
# Linux binary (glibc linked in with crt-static), so it starts on any distribution the
# GPU images use, whatever their glibc. Prints the binary's path on the last line.
#
#   scripts/build-static-agent.sh            # release (what you ship; about 5 min)
#   scripts/build-static-agent.sh --dev      # dev profile (what the tests use)
#
# The controller finds it through `[ec2] agent_binary` in config.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/runctl-target}"
TARGET=x86_64-unknown-linux-gnu
profile=release
args=(--release)
if [ "${1:-}" = "--dev" ]; then profile=debug; args=(); fi
# The flag reaches only the target's artifacts because --target is explicit: build
# scripts and proc-macros stay dynamic, as they must.
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --locked -p agent --bin runctl-agent --target "$TARGET" "${args[@]}" >&2
echo "$CARGO_TARGET_DIR/$TARGET/$profile/runctl-agent"
