#!/usr/bin/env bash
# The main job: set up, then boot the test guest in the lab and exercise it end to end.
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
exec target/debug/mcvmm-lab proof "$@"
