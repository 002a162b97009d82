#!/usr/bin/env bash
# Runs the leadflow demo on this machine: sets up PostgreSQL and RabbitMQ, builds `leadflow`, then
# `leadflow demo` migrates, applies deploy/demo, runs every service in one process, posts the sample events,
# waits until every demo delivery is final and prints where the emails are.
#
# Usage: deploy/demo.sh [leadflow demo options...]
# Emails go to ./outbox unless LEADFLOW_SMTP_URL is set (e.g. smtp://127.0.0.1:2525 for a local test server).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash deploy/setup.sh -q

# rustup installs into ~/.cargo/bin, which a non-login shell may not have on PATH yet.
if ! command -v cargo >/dev/null 2>&1 && [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]; then
    PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
fi

cargo build --bin leadflow

export LEADFLOW_LOG_FORMAT="${LEADFLOW_LOG_FORMAT:-pretty}"
export LEADFLOW_LOG="${LEADFLOW_LOG:-warn}"
if [ -z "${LEADFLOW_SMTP_URL:-}" ]; then
    mkdir -p "$PWD/outbox"
    export LEADFLOW_SMTP_URL="file://$PWD/outbox"
fi

exec "${CARGO_TARGET_DIR:-target}/debug/leadflow" demo "$@"
