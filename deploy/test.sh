#!/usr/bin/env bash
# Builds every binary and runs every test of the workspace against the local PostgreSQL and RabbitMQ,
# setting them up first if needed.
#
# Usage: deploy/test.sh [cargo test arguments...]    e.g. deploy/test.sh -p leadflow-sender -- --nocapture
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash deploy/setup.sh -q

# rustup installs into ~/.cargo/bin, which a non-login shell may not have on PATH yet.
if ! command -v cargo >/dev/null 2>&1 && [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]; then
    PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
fi

cargo build --workspace --bins
cargo test --workspace --all-targets "$@"
