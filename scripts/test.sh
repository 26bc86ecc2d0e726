#!/usr/bin/env bash
# Runs every test: unit tests, and integration tests that boot real guests under real
# KVM (on this machine when it has hardware KVM, in lab test hosts otherwise).
# The whole output is kept in target/test-output.log; when a test fails, why it failed
# is printed again at the very end, where a log cut short still shows it.
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
log=target/test-output.log
mkdir -p target
set +e
cargo test --workspace --locked --no-fail-fast "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ]; then
    echo
    echo "=== why the failing tests failed (whole output: $log) ==="
    # Each failure's block runs from its "---- name stdout ----" line to the list of
    # failures; of it, the warnings and the panic with its message, long lines cut.
    awk '
        /^---- .* stdout ----$/ { name = $0; inblock = 1; shown = 0; panic = 0; print name; next }
        inblock && /^failures:$/ { inblock = 0; next }
        !inblock { next }
        /panicked at/ { panic = 1 }
        (panic || /WARNING/) && shown < 60 {
            print (length($0) > 400 ? substr($0, 1, 400) " [...]" : $0); shown++
        }
    ' "$log"
    grep -E '^error: [0-9]+ targets? failed|^    `-p ' "$log" || true
fi
exit "$status"
