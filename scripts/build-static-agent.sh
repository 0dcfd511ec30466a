#!/usr/bin/env bash
# Builds the runctl-agent that EC2 instances (and RunPod pods) run: a fully static x86_64
# Linux binary (glibc linked in with crt-static), so it starts on any distribution the
# GPU images use, whatever their glibc. Prints the binary's path on the last line.
#
#   scripts/build-static-agent.sh            # release (what you ship; about 5 min)
#   scripts/build-static-agent.sh --dev      # dev profile (what the tests use)
#   scripts/build-static-agent.sh --relay    # the static runctl-relay instead (any --dev too)
#
# The controller finds it through `[ec2] agent_binary` in config.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/runctl-target}"
TARGET=x86_64-unknown-linux-gnu
profile=release
args=(--release)
package=agent
binary=runctl-agent
for arg in "$@"; do
    case "$arg" in
        --dev) profile=debug; args=() ;;
        --relay) package=relay; binary=runctl-relay ;;
        *) echo "usage: $0 [--dev] [--relay]" >&2; exit 2 ;;
    esac
done
# The flag reaches only the target's artifacts because --target is explicit: build
# scripts and proc-macros stay dynamic, as they must.
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --locked -p "$package" --bin "$binary" --target "$TARGET" "${args[@]}" >&2
echo "$CARGO_TARGET_DIR/$TARGET/$profile/$binary"
