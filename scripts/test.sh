#!/usr/bin/env bash
# Runs every test: unit tests, and integration tests that boot real guests under real
# KVM (on this machine when it has hardware KVM, in lab test hosts otherwise).
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
exec cargo test --workspace --locked --no-fail-fast "$@"
