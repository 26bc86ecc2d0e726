#!/usr/bin/env bash
# A single unprotected guest: set up, then boot the test guest with mcvmm on a KVM host (this machine if
# its /dev/kvm is hardware KVM, a lab test host otherwise) and exercise it end to end.
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
exec target/debug/mcvmm-lab run --kvm-host --guest \
    --bin target/debug/mcvmm:mcvmm --bin target/debug/mcvmm-agentctl:agentctl \
    --copy tests/scripts/guest.sh:guest.sh --copy scripts/guest-demo.sh:demo.sh \
    --timeout 300 -- sh demo.sh
