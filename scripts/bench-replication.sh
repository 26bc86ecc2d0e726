#!/usr/bin/env bash
# The replication benchmark (mcvmm-bench-replication) and its plot. Takes about 10 minutes.
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
python3 -c 'import matplotlib' 2>/dev/null || pip install --quiet matplotlib
target/debug/mcvmm-bench-replication "$@"
python3 scripts/plot-replication.py bench-results/replication.json bench-results/replication.png
