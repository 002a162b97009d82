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

# The OpenAPI document the API serves must be valid OpenAPI 3.1.
if ! python3 -c 'import openapi_spec_validator' 2>/dev/null; then
    echo "test: installing openapi-spec-validator for python3"
    python3 -m pip install --quiet --user openapi-spec-validator 2>/dev/null ||
        python3 -m pip install --quiet --user --break-system-packages openapi-spec-validator ||
        {
            echo "test: could not install openapi-spec-validator; install python3-openapi-spec-validator with apt-get" >&2
            exit 1
        }
fi
target/debug/leadflow openapi >target/openapi.json
python3 -m openapi_spec_validator --schema 3.1 target/openapi.json

cargo test --workspace --all-targets "$@"
