#!/bin/sh
# Installs a runctl binary ({{binary}}): download by a presigned URL (retried), verify
# its SHA-256, put it in place atomically. RUNCTL_ROOT prefixes every path and
# RUNCTL_INSTALL_ATTEMPTS bounds the attempts (both for the sandboxed boot in tests).
set -eu
root="${RUNCTL_ROOT:-}"
url='{{url}}'
sha256='{{sha256}}'
bin="$root/usr/local/bin/{{binary}}"
part="$bin.download"
mkdir -p "$root/usr/local/bin"
attempts="${RUNCTL_INSTALL_ATTEMPTS:-8}"
attempt=1
while :; do
    if curl --fail --silent --show-error --location --connect-timeout 10 --max-time 600 \
        --retry 5 --retry-delay 2 --output "$part" "$url" \
        && echo "$sha256  $part" | sha256sum --check --status; then
        break
    fi
    if [ "$attempt" -ge "$attempts" ]; then
        echo "runctl: could not download a verified {{binary}} after $attempt attempts" >&2
        rm -f "$part"
        exit 1
    fi
    attempt=$((attempt + 1))
    sleep $((attempt * 3))
done
chmod 0755 "$part"
mv -f "$part" "$bin"
echo "runctl: {{binary}} $sha256 installed at $bin"
