#!/usr/bin/env bash
# Installs and builds everything mcvmm's development needs on a fresh Debian 12 machine
# (run as root): Debian packages, the workspace, the test guest (kernel cached in
# ~/.cache/mcvmm), and the lab's test host kernel. Idempotent; fast when all is there.
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

packages=(
    qemu-system-x86      # test hosts (TCG with nested SVM) and the reference VMM
    linux-source-6.1     # the test guest kernel is built from it
    flex bison bc libelf-dev libssl-dev make gcc binutils xz-utils  # kernel build
    busybox-static dash iproute2 procps cpio  # test host user space, lab network, tests
)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    if [ "$(id -u)" != 0 ]; then
        echo "setup: installing packages needs root" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

echo "setup: building the workspace" >&2
cargo build --workspace --locked --quiet

echo "setup: building the test guest" >&2
guest-images/build.sh

echo "setup: preparing the lab" >&2
target/debug/mcvmm-lab setup >&2
