#!/usr/bin/env bash
# Builds the mcvmm test guest into guest-images/out/:
#   vmlinux     ELF kernel with a PVH entry point
#   bzImage     the same kernel for the 64-bit boot protocol
#   initrd.img  gzip'd initramfs: static /init and /bin/mcvmm-agent (Rust, this workspace)
#
# One command, idempotent. The kernel (the slow part, ~4 min on 2 cores) is built from
# Debian's linux-source-6.1 with kernel.config merged on tinyconfig, and cached outside
# the work tree under a key made of everything that goes into it, so a rebuild happens only
# when the fragment, the source package or this recipe changes.
#
# Environment: MCVMM_CACHE (default ~/.cache/mcvmm), JOBS (default: number of cores).
set -Eeuo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
out="$here/out"
cache="${MCVMM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mcvmm}"
jobs="${JOBS:-$(nproc)}"
src_tar=/usr/src/linux-source-6.1.tar.xz
# Bump when the kernel part of this recipe changes in a way the key would not see.
recipe_version=1

step="start"
hint=""
trap 'rc=$?; echo "guest-images/build.sh: step \"$step\" failed (exit $rc)${hint:+ — $hint}" >&2; exit $rc' ERR

say() { echo "guest-images/build.sh: $*" >&2; }
fail() { echo "guest-images/build.sh: step \"$step\" failed — $*" >&2; exit 1; }

step="check tools"
need_tool() { # tool package
    command -v "$1" >/dev/null 2>&1 || fail "'$1' not found; install Debian package '$2' (scripts/setup.sh does)"
}
need_tool make make
need_tool gcc gcc
need_tool flex flex
need_tool bison bison
need_tool bc bc
need_tool gzip gzip
need_tool xz xz-utils
need_tool tar tar
need_tool sha256sum coreutils
need_tool readelf binutils
need_tool cargo "rustup (cargo)"
[ -f /usr/include/libelf.h ] || fail "libelf headers missing; install Debian package 'libelf-dev'"
[ -f /usr/include/openssl/ssl.h ] || fail "OpenSSL headers missing; install Debian package 'libssl-dev'"
[ -f "$src_tar" ] || fail "$src_tar missing; install Debian package 'linux-source-6.1'"

step="prepare cache"
mkdir -p "$cache" "$out"
src_id=$(dpkg-query -W -f='${Version}' linux-source-6.1 2>/dev/null || stat -c '%s-%Y' "$src_tar")
key=$( { cat "$here/kernel.config"; echo "$src_id"; echo "$recipe_version"; } | sha256sum | cut -c1-16)
kdir="$cache/kernel-$key"

free_mib() { df -Pm "$1" | awk 'NR==2 {print $4}'; }

if [ -f "$kdir/done" ]; then
    say "kernel: cached ($kdir)"
else
    step="check disk space"
    have=$(free_mib "$cache")
    [ "$have" -ge 3072 ] || fail "only ${have} MiB free in $cache; the kernel build needs 3072 MiB"

    step="extract kernel source"
    say "kernel: extracting $src_tar (linux-source-6.1 $src_id)"
    rm -rf "$kdir"
    mkdir -p "$kdir/src"
    tar -xf "$src_tar" -C "$kdir/src" --strip-components=1

    step="configure kernel"
    say "kernel: configuring (tinyconfig + kernel.config)"
    make -s -C "$kdir/src" tinyconfig >/dev/null
    (cd "$kdir/src" && scripts/kconfig/merge_config.sh -m .config "$here/kernel.config" >/dev/null)
    make -s -C "$kdir/src" olddefconfig >/dev/null
    # merge_config only warns when an option cannot be set (a missing dependency); a
    # guest kernel silently missing, say, virtio-blk would waste an afternoon later.
    missing=""
    while IFS= read -r line; do
        case "$line" in
            CONFIG_*=n) opt=${line%%=*}; grep -q "^$opt=" "$kdir/src/.config" && missing="$missing $opt(wanted n)" ;;
            CONFIG_*) grep -qx "$line" "$kdir/src/.config" || missing="$missing $line" ;;
        esac
    done < "$here/kernel.config"
    [ -z "$missing" ] || fail "options did not take effect:$missing"

    step="build kernel"
    say "kernel: building vmlinux and bzImage with $jobs jobs (about 4 min on 2 cores)"
    start=$(date +%s)
    hint="full log in $kdir/build.log"
    make -C "$kdir/src" -j"$jobs" vmlinux bzImage >"$kdir/build.log" 2>&1
    hint=""
    gcc -O2 -o "$kdir/gen_init_cpio" "$kdir/src/usr/gen_init_cpio.c"
    cp "$kdir/src/vmlinux" "$kdir/vmlinux"
    cp "$kdir/src/arch/x86/boot/bzImage" "$kdir/bzImage"
    cp "$kdir/src/.config" "$kdir/config"
    # The source tree is 1.5 GB once built; only the products are kept.
    rm -rf "$kdir/src"
    touch "$kdir/done"
    say "kernel: built in $(( $(date +%s) - start )) s"
fi

step="install kernel"
cp "$kdir/vmlinux" "$kdir/bzImage" "$kdir/config" "$out/"
readelf -n "$out/vmlinux" | grep -q 'Xen' || fail "vmlinux has no PVH (Xen ELF note) entry point"

step="build agent"
say "agent: cargo build (static, release)"
target=x86_64-unknown-linux-gnu
# --target keeps these flags off build scripts and proc macros, which must stay dynamic.
(cd "$root" && RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --quiet --release --locked --target "$target" -p mcvmm-guest --bins)
bindir="$root/target/$target/release"
for b in mcvmm-init mcvmm-agent; do
    if readelf -l "$bindir/$b" | grep -q 'INTERP'; then
        fail "$b is dynamically linked; the guest has no libc"
    fi
done

step="build initramfs"
spec="$out/initramfs.list"
cat >"$spec" <<EOF
dir /dev 0755 0 0
nod /dev/console 0600 0 0 c 5 1
nod /dev/null 0666 0 0 c 1 3
dir /proc 0755 0 0
dir /sys 0755 0 0
dir /tmp 1777 0 0
dir /bin 0755 0 0
file /init $bindir/mcvmm-init 0755 0 0
file /bin/mcvmm-agent $bindir/mcvmm-agent 0755 0 0
EOF
"$kdir/gen_init_cpio" "$spec" | gzip -9 >"$out/initrd.img.tmp"
mv "$out/initrd.img.tmp" "$out/initrd.img"

step="done"
say "ready: $(cd "$out" && ls -s --block-size=K vmlinux bzImage initrd.img | tr '\n' ' ')"
