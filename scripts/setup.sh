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
    dmsetup                  # test hosts: a replica disk that starts failing (EIO)
    etcd-server etcd-client  # the fence's consensus store (and etcdctl), for its tests and the lab
    protobuf-compiler libprotobuf-dev  # the etcd client crate compiles etcd's API definitions
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

# The test hosts' other emulator: QEMU 10.0 from bookworm-backports, unpacked into the
# cache rather than installed over Debian 12's 7.2 (the reference VMM inside test hosts
# stays 7.2; which one emulates the hosts is lab/src/emulator.rs's choice, see
# docs/lab-notes.md). Both are set up so that `mcvmm-soak` can compare them.
cache=${MCVMM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mcvmm}
qemu10=$cache/qemu-10.0
if ! "$qemu10/usr/bin/qemu-system-x86_64" -L "$qemu10/usr/share/qemu" --version 2>/dev/null | grep -q 'version 10\.'; then
    echo "setup: unpacking QEMU 10.0 (bookworm-backports) into $qemu10" >&2
    sources=/etc/apt/sources.list.d/mcvmm-backports.sources
    if ! apt-cache policy qemu-system-x86 2>/dev/null | grep -q bookworm-backports; then
        [ "$(id -u)" = 0 ] || { echo "setup: adding bookworm-backports needs root" >&2; exit 1; }
        printf '%s\n' 'Types: deb' 'URIs: http://deb.debian.org/debian' 'Suites: bookworm-backports' \
            'Components: main' 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' >"$sources"
        apt-get update -qq
    fi
    debs=$(mktemp -d)
    # (As root into a root-only folder: apt's own download user could not write there.)
    (cd "$debs" && apt-get download -qq -o APT::Sandbox::User=root -t bookworm-backports \
        qemu-system-x86 qemu-system-common qemu-system-data >/dev/null)
    rm -rf "$qemu10.new" && mkdir -p "$qemu10.new"
    for f in "$debs"/*.deb; do dpkg -x "$f" "$qemu10.new"; done
    rm -rf "$debs" "$qemu10" && mv "$qemu10.new" "$qemu10"
    "$qemu10/usr/bin/qemu-system-x86_64" -L "$qemu10/usr/share/qemu" --version | head -1 >&2
fi

echo "setup: building the workspace" >&2
cargo build --workspace --locked --quiet

echo "setup: building the test guest" >&2
guest-images/build.sh

echo "setup: preparing the lab" >&2
target/debug/mcvmm-lab setup >&2
