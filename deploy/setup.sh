#!/usr/bin/env bash
# Prepares a Debian/Ubuntu machine to build and run leadflow locally: PostgreSQL, RabbitMQ, build tools, the
# `leadflow` database, autovacuum, and a Rust toolchain recent enough for the workspace.
#
# Idempotent and non-destructive: it installs only what is missing, starts only what is stopped, creates the
# database only if it does not exist, and on a machine that already has everything it only checks and exits.
# Uses sudo only when not run as root. Works with and without systemd (containers, WSL).
#
# Usage: deploy/setup.sh [-q]
#   -q   quiet: print only changes and errors
# Environment:
#   LEADFLOW_SETUP_TIMEOUT    seconds to wait for each service to come up (default 120)
#   LEADFLOW_SETUP_PG_PORT    PostgreSQL port on 127.0.0.1 (default 5432)
#   LEADFLOW_SETUP_AMQP_PORT  RabbitMQ port on 127.0.0.1 (default 5672)
#   LEADFLOW_SETUP_NO_TRUST   set to 1 to never edit pg_hba.conf (the script explains when it would)
set -euo pipefail

readonly PG_HOST=127.0.0.1
readonly PG_PORT="${LEADFLOW_SETUP_PG_PORT:-5432}"
readonly PG_SUPERUSER=postgres
readonly DB_NAME=leadflow
readonly AMQP_HOST=127.0.0.1
readonly AMQP_PORT="${LEADFLOW_SETUP_AMQP_PORT:-5672}"
readonly TIMEOUT="${LEADFLOW_SETUP_TIMEOUT:-120}"
readonly HBA_MARKER="# leadflow deploy/setup.sh: loopback access for local development"

QUIET=0
usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; }
while getopts ":qh" opt; do
    case "$opt" in
        q) QUIET=1 ;;
        h)
            usage
            exit 0
            ;;
        *)
            usage >&2
            exit 2
            ;;
    esac
done

# Service tools live in sbin, which is not on an ordinary user's PATH on Debian.
PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

info() { if [ "$QUIET" -eq 0 ]; then printf 'setup: %s\n' "$*"; fi; }
# Something on the machine changes: always said, even with -q.
change() { printf 'setup: %s\n' "$*"; }
die() {
    printf 'setup: error: %s\n' "$*" >&2
    exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif have sudo; then
        sudo "$@"
    else
        die "'$*' needs root and sudo is not installed: run this script as root"
    fi
}

# Runs a command as the `postgres` OS account (peer authentication over the local socket).
as_postgres() {
    if [ "$(id -u)" -eq 0 ]; then
        (cd / && runuser -u postgres -- "$@")
    else
        (cd / && sudo -u postgres -- "$@")
    fi
}

systemd_running() { [ -d /run/systemd/system ]; }

# Polls `cmd...` once a second until it succeeds; gives up with an error after TIMEOUT seconds.
wait_for() {
    local what="$1"
    shift
    local deadline=$((SECONDS + TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            die "$what did not come up within ${TIMEOUT}s (raise LEADFLOW_SETUP_TIMEOUT, or check its log)"
        fi
        sleep 1
    done
}

tcp_open() { timeout 3 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; }

# An AMQP 0-9-1 broker answers the protocol header with a method frame (type byte 1, connection.start).
amqp_answers() {
    # shellcheck disable=SC2016 # expanded by the inner shell
    timeout 5 bash -c '
        exec 3<>"/dev/tcp/$0/$1" || exit 1
        printf "AMQP\000\000\011\001" >&3
        IFS= read -r -n 1 -d "" byte <&3 || exit 1
        [ "$byte" = "$(printf "\001")" ]
    ' "$AMQP_HOST" "$AMQP_PORT" 2>/dev/null
}

pg_answers() {
    if have pg_isready; then
        pg_isready -q -h "$PG_HOST" -p "$PG_PORT" -t 3
    else
        tcp_open "$PG_HOST" "$PG_PORT"
    fi
}

pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

# ---------------------------------------------------------------------------------------------------------------
# Packages
# ---------------------------------------------------------------------------------------------------------------
install_missing_packages() {
    local missing=()

    if pg_answers || compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null; then
        # A server is installed or already answers (perhaps in a container): only the client tools may be missing.
        if ! have psql || ! have pg_isready || ! have createdb; then missing+=(postgresql-client); fi
    else
        missing+=(postgresql)
    fi
    if ! amqp_answers && ! have rabbitmq-server && ! pkg_installed rabbitmq-server; then
        missing+=(rabbitmq-server)
    fi
    if ! pkg_installed build-essential && ! { have cc && have make; }; then missing+=(build-essential); fi
    if ! have pkg-config; then missing+=(pkg-config); fi
    if ! have curl; then missing+=(curl); fi
    if [ ! -s /etc/ssl/certs/ca-certificates.crt ] && ! pkg_installed ca-certificates; then
        missing+=(ca-certificates)
    fi

    if [ "${#missing[@]}" -eq 0 ]; then
        info "packages: all present"
        return
    fi
    have apt-get || die "missing ${missing[*]} and apt-get is not available: install them with your package manager"

    change "installing ${missing[*]}"
    local log
    log="$(mktemp)"
    if ! {
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q &&
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    } >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        die "apt-get could not install ${missing[*]}"
    fi
    if [ "$QUIET" -eq 0 ]; then tail -n 5 "$log"; fi
    rm -f "$log"
}

# ---------------------------------------------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------------------------------------------
start_postgres() {
    if pg_answers; then
        info "PostgreSQL: answering on $PG_HOST:$PG_PORT"
        return
    fi
    change "starting PostgreSQL"
    if systemd_running && as_root systemctl start postgresql; then
        :
    elif have service && [ -x /etc/init.d/postgresql ] && as_root service postgresql start; then
        :
    elif have pg_lsclusters; then
        local version name _port status _rest
        while read -r version name _port status _rest; do
            if [ "$status" != online ]; then as_root pg_ctlcluster "$version" "$name" start || true; fi
        done < <(pg_lsclusters --no-header)
    else
        die "PostgreSQL is installed but not running, and no way to start it was found"
    fi
    wait_for "PostgreSQL on $PG_HOST:$PG_PORT" pg_isready -q -h "$PG_HOST" -p "$PG_PORT" -t 3
    info "PostgreSQL: up"
}

psql_tcp() {
    PGCONNECT_TIMEOUT=5 psql -X -w -q -v ON_ERROR_STOP=1 -h "$PG_HOST" -p "$PG_PORT" -U "$PG_SUPERUSER" -d postgres "$@"
}

can_login() { psql_tcp -Atc 'SELECT 1' >/dev/null 2>&1; }

# leadflow's default LEADFLOW_DATABASE_URL is postgres://postgres@127.0.0.1:5432/leadflow: the superuser over TCP
# on loopback, without a password (the tests also create a database per test, which needs that right). A fresh
# Debian cluster allows `postgres` only through the local socket (peer) and asks for a password over TCP, and the
# role has none. If that login fails and no PGPASSWORD is given, this adds `trust` for the `postgres` role from
# 127.0.0.1 and ::1 only, ahead of the other rules, and reloads the server. Trade-off: any account on this
# machine can then connect as the database superuser, which is fine for a single-user laptop or CI box and wrong
# for a shared host. There, set LEADFLOW_SETUP_NO_TRUST=1 and instead give the role a password
# (`ALTER ROLE postgres PASSWORD '...'`), put it in LEADFLOW_DATABASE_URL and export PGPASSWORD for this script.
# To undo: delete the lines after the marker comment in pg_hba.conf (a copy of the original is kept beside it).
ensure_postgres_login() {
    if can_login; then
        info "PostgreSQL: $PG_SUPERUSER can log in over TCP"
        return
    fi
    local how="give the $PG_SUPERUSER role a password, export PGPASSWORD and put it in LEADFLOW_DATABASE_URL"
    if [ -n "${PGPASSWORD:-}" ]; then die "cannot log in as $PG_SUPERUSER on $PG_HOST:$PG_PORT with PGPASSWORD"; fi
    if [ "${LEADFLOW_SETUP_NO_TRUST:-0}" = 1 ]; then die "cannot log in as $PG_SUPERUSER on $PG_HOST:$PG_PORT: $how"; fi
    getent passwd postgres >/dev/null ||
        die "cannot log in as $PG_SUPERUSER on $PG_HOST:$PG_PORT and PostgreSQL is not local: $how"

    local hba
    hba="$(as_postgres psql -X -p "$PG_PORT" -Atqc 'SHOW hba_file')" || die "cannot reach PostgreSQL through its local socket"
    if as_root grep -qF "$HBA_MARKER" "$hba"; then
        die "$hba already trusts $PG_SUPERUSER on loopback yet login fails: check the server log"
    fi
    change "allowing $PG_SUPERUSER to log in from loopback without a password ($hba)"
    local tmp
    tmp="$(mktemp)"
    {
        printf '%s (see the script for why; delete these three lines to undo)\n' "$HBA_MARKER"
        printf 'host    all    %s    127.0.0.1/32    trust\n' "$PG_SUPERUSER"
        printf 'host    all    %s    ::1/128         trust\n' "$PG_SUPERUSER"
        as_root cat "$hba"
    } >"$tmp"
    as_root cp -p "$hba" "$hba.before-leadflow"
    # cp onto the existing file keeps its owner and mode.
    as_root cp "$tmp" "$hba"
    rm -f "$tmp"
    as_postgres psql -X -p "$PG_PORT" -Atqc 'SELECT pg_reload_conf()' >/dev/null
    wait_for "login as $PG_SUPERUSER after reloading pg_hba.conf" can_login
}

ensure_database() {
    if [ "$(psql_tcp -Atc "SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'")" = 1 ]; then
        info "PostgreSQL: database $DB_NAME exists"
        return
    fi
    change "creating database $DB_NAME"
    createdb -w -h "$PG_HOST" -p "$PG_PORT" -U "$PG_SUPERUSER" "$DB_NAME"
}

setting_is_on() { [ "$(psql_tcp -Atc "SHOW $1")" = on ]; }

# Deliveries are claimed from a hot table; without autovacuum dead index entries pile up and claims slow down
# by half within seconds. Some images ship PostgreSQL with autovacuum off; ALTER SYSTEM overrides that.
ensure_autovacuum() {
    local setting
    for setting in track_counts autovacuum; do
        if setting_is_on "$setting"; then
            info "PostgreSQL: $setting is on"
            continue
        fi
        change "turning PostgreSQL $setting on (ALTER SYSTEM)"
        psql_tcp -c "ALTER SYSTEM SET $setting = on" -c 'SELECT pg_reload_conf()' >/dev/null
        wait_for "PostgreSQL $setting = on" setting_is_on "$setting"
    done
}

# ---------------------------------------------------------------------------------------------------------------
# RabbitMQ
# ---------------------------------------------------------------------------------------------------------------
start_rabbitmq() {
    if amqp_answers; then
        info "RabbitMQ: answering on $AMQP_HOST:$AMQP_PORT"
        return
    fi
    change "starting RabbitMQ"
    if systemd_running && as_root systemctl start rabbitmq-server; then
        :
    elif have service && [ -x /etc/init.d/rabbitmq-server ] && as_root service rabbitmq-server start; then
        :
    elif have rabbitmq-server; then
        # The Debian wrapper switches to the rabbitmq account by itself. On a small machine the Erlang VM's
        # busy-waiting schedulers take CPU from the services; these flags give it back.
        as_root env RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="${RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS:-+sbwt none +sbwtdcpu none +sbwtdio none}" \
            rabbitmq-server -detached
    else
        die "RabbitMQ is not answering on $AMQP_HOST:$AMQP_PORT and rabbitmq-server is not installed"
    fi
    wait_for "RabbitMQ on $AMQP_HOST:$AMQP_PORT" amqp_answers
    info "RabbitMQ: up"
}

# ---------------------------------------------------------------------------------------------------------------
# Rust
# ---------------------------------------------------------------------------------------------------------------
ensure_rust() {
    local repo_root required have_version cargo_bin
    repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    required="$(sed -n 's/^rust-version *= *"\([0-9.]*\)".*/\1/p' "$repo_root/Cargo.toml" | head -n 1)"
    required="${required:-1.85}"
    local rustup_hint="install Rust $required or newer with rustup (https://rustup.rs) and run this script again;
       Debian's own cargo package is too old for this workspace"

    cargo_bin="$(command -v cargo || true)"
    if [ -z "$cargo_bin" ] && [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]; then
        cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin/cargo"
        change "cargo is in ${cargo_bin%/cargo} but not on PATH: run '. \"${CARGO_HOME:-$HOME/.cargo}/env\"'"
    fi
    [ -n "$cargo_bin" ] || die "cargo not found: $rustup_hint"

    have_version="$("$cargo_bin" --version | awk '{print $2}')"
    if [ "$(printf '%s\n%s\n' "$required" "${have_version%%-*}" | sort -V | head -n 1)" != "$required" ]; then
        if have rustup || [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/rustup" ]; then
            die "cargo $have_version is older than $required: run 'rustup update stable'"
        fi
        die "cargo $have_version ($cargo_bin) is older than $required: $rustup_hint"
    fi
    info "Rust: cargo $have_version"
}

install_missing_packages
start_postgres
start_rabbitmq
ensure_postgres_login
ensure_database
ensure_autovacuum
ensure_rust
info "ready: postgres://$PG_SUPERUSER@$PG_HOST:$PG_PORT/$DB_NAME, amqp://guest:guest@$AMQP_HOST:$AMQP_PORT/%2f"
