#!/usr/bin/env bash
# Runs every test: unit tests, and integration tests that boot real guests under real
# KVM (on this machine when it has hardware KVM, in lab test hosts otherwise).
# The whole output is kept in target/test-output.log; when a test fails, why it failed
# is printed again at the very end, where a log cut short still shows it, with the
# folders under target/lab-failures/ that keep the failed lab tests' consoles and logs.
# Last come the run's retries (tests/src/retry.rs): a table, then the line
# `retries: N of 3 allowed`; a run that took more than 3 fails, whatever passed.
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
log=target/test-output.log
mkdir -p target
rm -rf target/lab-failures
export MCVMM_RETRY_LEDGER=$PWD/target/retries.jsonl
rm -f "$MCVMM_RETRY_LEDGER"
set +e
cargo test --workspace --locked --no-fail-fast "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ]; then
    echo
    echo "=== why the failing tests failed (whole output: $log) ==="
    # Each failure's block runs from its "---- name stdout ----" line to the list of
    # failures; of it, the panic with the start of its message first (what a log cut to
    # its last lines must still show), then the test's warnings; long lines cut.
    awk '
        function cut(l) { return length(l) > 300 ? substr(l, 1, 300) " [...]" : l }
        function flush() {
            if (name == "") return
            print name
            for (i = 0; i < np && i < 25; i++) print panic[i]
            for (i = 0; i < nw && i < 8; i++) print warn[i]
            name = ""
        }
        /^---- .* stdout ----$/ { flush(); name = $0; inblock = 1; np = 0; nw = 0; inpanic = 0; next }
        inblock && /^failures:$/ { flush(); inblock = 0; next }
        !inblock { next }
        /panicked at/ { inpanic = 1 }
        inpanic && /^stack backtrace:$/ { inpanic = 2 }
        inpanic == 2 { next }
        inpanic { panic[np++] = cut($0); next }
        /WARNING/ { warn[nw++] = cut($0) }
        END { flush() }
    ' "$log"
    grep -E '^error: [0-9]+ targets? failed|^    `-p ' "$log" || true
fi
kept=$(find target/lab-failures -mindepth 2 -maxdepth 2 -type d 2>/dev/null | sort)
if [ -n "$kept" ]; then
    echo
    echo "=== evidence of lab failures (consoles of test hosts and guests, VMM logs) ==="
    echo "$kept"
fi
target/debug/mcvmm-retries "$MCVMM_RETRY_LEDGER" || status=1
exit "$status"
