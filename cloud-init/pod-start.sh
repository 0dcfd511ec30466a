set -eu
# A RunPod pod's start command: installs the static agent by its presigned URL (curl, wget
# or python3, whichever the image has), checks its SHA-256, writes the agent's config
# (owner-only; a cluster's pods share one start command, so each writes the config of its
# own NODE_RANK, which RunPod sets) and becomes the agent's supervisor (PID 1). Everything lives on the pod's
# volume, which outlives a container restart (the container disk does not): a restarted
# pod finds its verified agent and its state there and needs no download.
root="${RUNCTL_POD_ROOT:-}"
if [ -z "$root" ]; then
    if mkdir -p /workspace/runctl 2>/dev/null; then root=/workspace/runctl; else root="$HOME/.runctl"; fi
fi
umask 077
mkdir -p "$root/bin"
bin="$root/bin/runctl-agent"
url='{{url}}'
sha256='{{sha256}}'
say() { echo "runctl: $*" >&2; }
digest() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d ' ' -f 1
    elif command -v python3 >/dev/null 2>&1; then
        python3 -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$1"
    else
        say "the image has neither sha256sum nor python3 to check the agent with"
        return 1
    fi
}
fetch() {
    if command -v curl >/dev/null 2>&1; then
        curl --fail --silent --show-error --location --connect-timeout 10 --max-time 600 \
            --retry 5 --retry-delay 2 --output "$2" "$1"
    elif command -v wget >/dev/null 2>&1; then
        wget -q -T 60 -t 5 -O "$2" "$1"
    elif command -v python3 >/dev/null 2>&1; then
        python3 -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' "$1" "$2"
    else
        say "the image has none of curl, wget or python3 to download the agent with"
        exit 2
    fi
}
if [ -x "$bin" ] && [ "$(digest "$bin")" = "$sha256" ]; then
    say "agent $sha256 already installed at $bin"
else
    attempts="${RUNCTL_INSTALL_ATTEMPTS:-8}"
    attempt=1
    while :; do
        rm -f "$bin.download"
        if fetch "$url" "$bin.download" && [ "$(digest "$bin.download")" = "$sha256" ]; then
            break
        fi
        if [ "$attempt" -ge "$attempts" ]; then
            say "could not download a verified agent after $attempt attempts"
            rm -f "$bin.download"
            exit 1
        fi
        attempt=$((attempt + 1))
        sleep $((attempt * 3))
    done
    chmod 0700 "$bin.download"
    mv -f "$bin.download" "$bin"
    say "agent $sha256 installed at $bin"
fi
{{write_config}}
exec "$bin" --supervise --config "$root/agent.toml"
