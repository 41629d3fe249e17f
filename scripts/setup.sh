#!/usr/bin/env bash
# Installs what the quickstart and the test suite need, then builds the `dtl` binary.
# Safe to run again: finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -x scripts/setup-data.sh ]; then
    scripts/setup-data.sh
fi

echo "setup: building dtl (release)"
cargo build --release -p dtl-cli
echo "setup: done; the binary is target/release/dtl"
