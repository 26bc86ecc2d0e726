#!/usr/bin/env bash
# How soon a secondary notices a killed primary, with and without mcvmm's memory keeper
# (MCVMM_KEEPER=off). One lab test host runs both sides (one clock); a 1 GiB guest with
# a 64 MiB memory workload is protected, its primary killed with SIGKILL, and the
# secondary's log polled every 10 ms for `primary lost`. Prints one line per kill.
# Usage: scripts/failover-detection.sh [ROUNDS]   (each round: one kill off, one on)
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
rounds=${1:-2}
cargo build --workspace --bins --quiet
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
modes=$(for _ in $(seq "$rounds"); do printf 'off on '; done)
cat >"$work/exp.sh" <<SCRIPT
. ./guest.sh
trap cleanup_guests EXIT
for mode in $modes; do
  export MCVMM_KEEPER=\$mode
  rm -f fa.img fb.img fo.*; truncate -s 32M fa.img fb.img
  if ! start_pair fo 1024 fa.img fb.img >/dev/null || ! wait_protected fo >/dev/null; then
    echo "keeper=\$mode: the pair did not get protected (lab)"; ip netns del fo; continue
  fi
  agent fo mem-start 64 2000 >/dev/null
  sleep 3
  pid=\$(cat fo.pid)
  t0=\$(now_ms); kill -9 \$pid 2>/dev/null || true
  i=0; while ! grep -q "taking over" fo.s.log && [ \$i -lt 600 ]; do sleep 0.01; i=\$((i+1)); done
  if grep -q triple fo.log; then
    echo "keeper=\$mode: the primary's guest had crashed before the kill (lab); not counted"
  else
    echo "keeper=\$mode primary_lost_ms=\$(( \$(now_ms) - t0 ))"
  fi
  kill -9 \$(cat fo.s.pid) 2>/dev/null; wait 2>/dev/null; ip netns del fo
done
SCRIPT
target/debug/mcvmm-lab run --timeout $((rounds * 1200)) --guest --mem-mib 4096 \
    --bin target/debug/mcvmm:mcvmm --bin target/debug/mcvmm-agentctl:agentctl \
    --copy tests/scripts/guest.sh:guest.sh --copy "$work/exp.sh:exp.sh" sh exp.sh
