#!/usr/bin/env bash
# The main job: set up, then protect the test guest with mcvmm — a primary and a secondary
# on two lab test hosts, a client on the lab network writing to the guest — and run a
# failover drill, the pair fenced by an etcd on the lab network: kill the primary's mcvmm,
# cut the primary's host off for 3 s, freeze the primary's mcvmm for 3 s, then power off
# the whole primary host. Prints what each round checked and how long the takeover took.
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
exec target/debug/mcvmm-drill --rounds "${ROUNDS:-1}" --partition-rounds "${PARTITION_ROUNDS:-1}" \
    --stall-rounds "${STALL_ROUNDS:-1}" --host-rounds "${HOST_ROUNDS:-1}" "$@"
