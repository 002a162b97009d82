#!/usr/bin/env bash
# Benchmarks the leadflow pipeline on this machine: the real services, one process each, against PostgreSQL,
# RabbitMQ and postfix's smtp-sink (counting only), fully durable, next to the components' own ceilings measured
# in the same run. Prints the report; docs/benchmarks.md explains the method and the figures.
#
# Usage: deploy/bench.sh [--quick] [--duration 10m] [--rate N] [--rates 1000,2000,...] [--step-duration 60s]
#                        [--ingest-events N] [--isolated-emails N]
#   --quick          small counts and short phases (under a minute once built); fails only when something is
#                    broken (an email lost, doubled or dead-lettered), never on speed
#   --duration D     length of the sustained end-to-end run (default 10m; none with --quick unless given)
#   --rate N         offered events/s (one email each) of the sustained run (default: highest sustained ladder rate)
#   --rates A,B,...  the latency ladder's offered rates; it stops at the first rate not sustained
# Environment:
#   BENCH_DATABASE_URL  PostgreSQL server (default postgres://postgres@127.0.0.1:5432); a scratch database is
#                       created on it and dropped at the end
#   BENCH_AMQP_URL      RabbitMQ (default amqp://guest:guest@127.0.0.1:5672/%2f); a scratch namespace is used and
#                       deleted at the end
#   LEADFLOW_*          passed to the services (e.g. LEADFLOW_SENDER_CONCURRENCY=64); the bench sets the scheduler
#                       tick to 100ms unless given
#   BENCH_KEEP_LOGS=1   keep the work folder (service logs) even when the run passed
#   BENCH_LEADFLOW      a leadflow binary built earlier, with leadflow-bench beside it: run those instead of
#                       building (to compare two commits back to back)
#   BENCH_SINK_ARGS     extra smtp-sink options, e.g. "-f ." (refuse every message) to see the run fail
set -euo pipefail

cd "$(dirname "$0")/.."
PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
readonly PG_BASE="${BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432}"
readonly AMQP_URL="${BENCH_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
export BENCH_AMQP_URL="$AMQP_URL"

for arg in "$@"; do
    case "$arg" in
        -h | --help)
            sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"
            exit 0
            ;;
    esac
done

say() { printf 'bench: %s\n' "$*"; }
die() {
    printf 'bench: error: %s\n' "$*" >&2
    exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif have sudo; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}
port_in_use() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }

# postfix ships smtp-sink and smtp-source. The package is installed without configuration and without starting
# the postfix MTA, so nothing listens on port 25 afterwards.
install_postfix_tools() {
    if have smtp-sink && have smtp-source; then
        return
    fi
    have apt-get || die "smtp-sink and smtp-source are missing: install postfix's test programs"
    say "installing postfix (for smtp-sink and smtp-source; the mail server itself is left unconfigured and stopped)"
    local smtp_was_listening=0 added_policy=0
    port_in_use 25 && smtp_was_listening=1
    echo "postfix postfix/main_mailer_type select No configuration" | as_root debconf-set-selections
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        # Keeps the package's scripts from starting the MTA (on systems without systemd).
        printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
        as_root chmod 755 /usr/sbin/policy-rc.d
        added_policy=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postfix >/dev/null ||
        { as_root apt-get update -q >/dev/null && as_root env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -q --no-install-recommends postfix >/dev/null; }
    if [ "$added_policy" -eq 1 ]; then
        as_root rm -f /usr/sbin/policy-rc.d
    fi
    if have systemctl && [ -d /run/systemd/system ]; then
        as_root systemctl disable --now postfix >/dev/null 2>&1 || true
    fi
    if [ "$smtp_was_listening" -eq 0 ] && port_in_use 25; then
        say "stopping the postfix MTA the package started"
        as_root postfix stop >/dev/null 2>&1 || true
    fi
    if ! have smtp-sink || ! have smtp-source; then
        die "postfix installed but smtp-sink/smtp-source not found"
    fi
}

machine() {
    say "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(nproc) cores," \
        "$(free -g | awk '/^Mem:/ {print $2}') GiB memory, kernel $(uname -r)"
    say "versions: $(rustc --version 2>/dev/null || echo 'rustc ?'); rabbitmq-server" \
        "$(dpkg-query -W -f '${Version}' rabbitmq-server 2>/dev/null || echo '?'); postfix" \
        "$(dpkg-query -W -f '${Version}' postfix 2>/dev/null || echo '?'); $(psql --version 2>/dev/null | head -1)"
    say "load average before the run: $(cut -d' ' -f1-3 /proc/loadavg)"
}

have cargo || die "cargo not found: run deploy/setup.sh first (it installs Rust)"
# Every run: installs and starts what is missing, and turns autovacuum on where an image ships it off (without
# it the hot tables' statistics never follow the backlog and their dead rows pile up).
bash deploy/setup.sh -q
install_postfix_tools
machine

if [ -n "${BENCH_LEADFLOW:-}" ]; then
    # A build made earlier (e.g. a copy of another commit's binaries), to compare two versions on one machine.
    [ -x "$BENCH_LEADFLOW" ] && [ -x "$(dirname "$BENCH_LEADFLOW")/leadflow-bench" ] ||
        die "BENCH_LEADFLOW=$BENCH_LEADFLOW: need an executable leadflow with leadflow-bench beside it"
    say "using the leadflow binaries in $(dirname "$BENCH_LEADFLOW") (not building)"
    LEADFLOW="$BENCH_LEADFLOW"
    BENCH="$(dirname "$BENCH_LEADFLOW")/leadflow-bench"
else
    say "building (release)"
    cargo build --release -q --bin leadflow --bin leadflow-bench
    LEADFLOW=target/release/leadflow
    BENCH=target/release/leadflow-bench
fi
BUILT_AT=$SECONDS
say "built in ${BUILT_AT}s"
readonly LEADFLOW BENCH

ID="$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
readonly DB="lf_bench_${ID}"
readonly NS="bench${ID}"
WORK="$(mktemp -d /tmp/leadflow-bench.XXXXXX)"
readonly WORK
SINK_PID=""
BENCH_PID=""
CREATED_DB=0

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [ -n "$BENCH_PID" ] && kill -0 "$BENCH_PID" 2>/dev/null; then
        # It stops the services it started, then exits.
        kill -TERM "$BENCH_PID" 2>/dev/null || true
        wait "$BENCH_PID" 2>/dev/null || true
    fi
    if [ -n "$SINK_PID" ]; then
        kill "$SINK_PID" 2>/dev/null || true
        wait "$SINK_PID" 2>/dev/null || true
    fi
    "$BENCH" cleanup --amqp-url "$AMQP_URL" --namespace "$NS" >/dev/null 2>&1 ||
        say "warning: could not delete AMQP namespace $NS"
    if [ "$CREATED_DB" -eq 1 ]; then
        psql "$PG_BASE/postgres" -qAt -v ON_ERROR_STOP=1 -c "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" \
            >/dev/null 2>&1 || say "warning: could not drop database $DB"
    fi
    if [ "$status" -eq 0 ] && [ "${BENCH_KEEP_LOGS:-0}" != 1 ]; then
        rm -rf "$WORK"
    else
        say "service logs kept in $WORK"
    fi
    say "scratch database $DB and namespace $NS removed; ${SECONDS}s in all, $((SECONDS - ${BUILT_AT:-0}))s after the build"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

psql "$PG_BASE/postgres" -qAt -v ON_ERROR_STOP=1 -c "CREATE DATABASE \"$DB\"" >/dev/null
CREATED_DB=1

# smtp-sink on a free loopback port (below the ephemeral range), counting only (-c: counters to a file; no -d,
# nothing is saved). A port taken between the check and the bind: the next candidate.
SINK_USER=()
[ "$(id -u)" -eq 0 ] && SINK_USER=(-u nobody)
PORT=""
for candidate in $(shuf -i 20000-32000 -n 20); do
    ss -Hatn "sport = :$candidate" 2>/dev/null | grep -q . && continue
    # shellcheck disable=SC2086 # word splitting of the extra options is wanted
    smtp-sink -c "${SINK_USER[@]}" -m 1024 ${BENCH_SINK_ARGS:-} "127.0.0.1:$candidate" 1024 >"$WORK/sink.counter" 2>"$WORK/sink.err" &
    SINK_PID=$!
    for _ in $(seq 100); do
        port_in_use "$candidate" && break
        kill -0 "$SINK_PID" 2>/dev/null || break
        sleep 0.05
    done
    if port_in_use "$candidate" && kill -0 "$SINK_PID" 2>/dev/null; then
        PORT="$candidate"
        break
    fi
    wait "$SINK_PID" 2>/dev/null || true
    SINK_PID=""
done
[ -n "$PORT" ] || die "smtp-sink did not start: $(cat "$WORK/sink.err")"
say "scratch database $DB, namespace $NS, smtp-sink on 127.0.0.1:$PORT (pid $SINK_PID)"

"$BENCH" run \
    --leadflow "$LEADFLOW" \
    --database-url "$PG_BASE/$DB" \
    --amqp-url "$AMQP_URL" \
    --namespace "$NS" \
    --smtp "127.0.0.1:$PORT" \
    --sink-pid "$SINK_PID" \
    --sink-counter "$WORK/sink.counter" \
    --work-dir "$WORK" \
    "$@" &
# In the background, so a signal to this script runs the cleanup at once (it stops the bench first).
BENCH_PID=$!
wait "$BENCH_PID"
