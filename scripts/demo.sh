#!/usr/bin/env bash
# The main job: set up, then protect the test guest with mcvmm — a primary and a secondary
# on two lab test hosts, a client on the lab network writing to the guest — and run a
# failover drill: kill the primary's mcvmm, then (second round) the whole primary host.
# Prints what each round checked and how long the takeover took.
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
exec target/debug/mcvmm-drill --rounds "${ROUNDS:-1}" --host-rounds "${HOST_ROUNDS:-1}" "$@"
