# Shell helpers for integration tests, sourced on a KVM host (in /work of a lab test host
# or the local work folder). Each guest gets a network namespace of its own with a tap,
# so tests never see each other's guests, and everything goes with the namespace.
#
#   start_guest NAME KERNEL VCPUS MEM_MIB [mcvmm args...]   boots; waits for the agent
#                                                  ($CMDLINE replaces the kernel command line)
#   agent NAME ARGS...                                       mcvmm-agentctl against it
#   kill_guest NAME                                          SIGKILL to its mcvmm
#   restore_guest NAME DIR [mcvmm args...]                   continues it from a snapshot
#   stop_guest NAME                                          SHUTDOWN; waits; prints rc; fails unless 0
#   start_pair NAME MEM_MIB PRIMARY_DISKS SECONDARY_DISKS [mcvmm args...]
#                          a replicating primary and its secondary (see below)
#   wait_protected NAME    until the primary reports the guest protected
#   phase NAME             says what the guests do now (see below)
set -u

guest_ip() { echo "10.99.0.2"; }

# Says what the guests are doing now (boot, running, epochs, protected, after-restore,
# after-takeover), on stderr: a failed test is judged by the last phase said (see
# tests/src/retry.rs: a guest lost after a restore or a takeover is never the lab's).
phase() { echo "MCVMM-PHASE $1" >&2; }

# Guests this shell started; `cleanup_guests` (run on exit by the tests) kills what is
# left of them, so that a failed script does not leave a guest spinning on the host.
started_guests=""
cleanup_guests() {
    rc=$?
    if [ $rc -ne 0 ]; then
        # A failed script: what its VMMs and guests said last.
        for n in $started_guests; do
            for f in "$n.log" "$n.console" "$n.s.log" "$n.s.console"; do
                [ -f "$f" ] && { echo "--- tail of $f"; tail -15 "$f"; }
            done
        done
    fi
    # The device watchdog's rescues (see mcvmm's event loop), for the test to report.
    for n in $started_guests; do
        grep -h "raised again" "$n.log" "$n.s.log" 2>/dev/null | sed "s/^/WATCHDOG $n: /" >&2 || true
    done
    for n in $started_guests; do
        # (set -e may be on: nothing here may fail.)
        if [ -f "$n.pid" ]; then kill -9 "$(cat "$n.pid")" 2>/dev/null || true; fi
        if [ -f "$n.s.pid" ]; then kill -9 "$(cat "$n.s.pid")" 2>/dev/null || true; fi
        ip netns del "$n" 2>/dev/null || true
    done
}

start_guest() {
    name=$1 kernel=$2 cpus=$3 mem=$4; shift 4
    ip netns add "$name" || return 1
    started_guests="$started_guests $name"
    ip netns exec "$name" ip link set lo up
    ip netns exec "$name" ip tuntap add dev gtap mode tap
    ip netns exec "$name" ip addr add 10.99.0.1/24 dev gtap
    ip netns exec "$name" ip link set gtap up
    phase boot
    ip netns exec "$name" ./mcvmm run --kernel "guest/$kernel" --initrd guest/initrd.img \
        --vcpus "$cpus" --mem-mib "$mem" --cmdline "${CMDLINE:-panic=-1 mcvmm.ip=10.99.0.2/24}" \
        --tap gtap --serial "$name.console" --api-sock "$name.sock" "$@" >"$name.log" 2>&1 &
    echo $! >"$name.pid"
    if ip netns exec "$name" ./agentctl --addr 10.99.0.2:7000 --wait 60 ping; then
        phase running
        return 0
    fi
    echo "guest $name did not answer; mcvmm log:"; cat "$name.log"; tail -20 "$name.console"
    return 1
}

# Kills NAME's mcvmm hard: the guest is not told. (The secondary of a pair takes over.)
kill_guest() {
    [ -f "$1.s.pid" ] && phase after-takeover
    kill -9 "$(cat "$1.pid")" 2>/dev/null || true
    wait "$(cat "$1.pid")" 2>/dev/null || true
}

# Continues NAME in a new mcvmm from snapshot DIR, in its namespace, on its tap (the
# disks are given again as arguments); waits for the agent.
restore_guest() {
    name=$1 dir=$2; shift 2
    phase after-restore
    ip netns exec "$name" ./mcvmm run --restore "$dir" --tap gtap --serial "$name.console" \
        --api-sock "$name.sock" "$@" >>"$name.log" 2>&1 &
    echo $! >"$name.pid"
    if ! ip netns exec "$name" ./agentctl --addr 10.99.0.2:7000 --wait 30 ping; then
        echo "restored guest $name did not answer; mcvmm log:"; cat "$name.log"
        tail -20 "$name.console"
        return 1
    fi
}

agent() {
    name=$1; shift
    rc=0
    # No request takes minutes; a guest that accepted the connection but stopped
    # answering must fail the script, not hold it until the test's time limit.
    # (By its path: busybox's timeout would run its own ip applet, which has no netns.)
    timeout 120 "$(command -v ip)" netns exec "$name" ./agentctl --addr 10.99.0.2:7000 "$@" || rc=$?
    if [ $rc -ne 0 ]; then
        # On stderr: a caller that captures or discards the reply must not lose these.
        {
            echo "agent $* failed ($rc); guest console:"; tail -20 "$name.console"; echo "mcvmm:"; cat "$name.log"
            # Where the guest's queues stand (a stalled queue shows there), and the tap's.
            # (Diagnostics only: a VMM already gone must not end the script before its rc.)
            if [ -S "$name.sock" ]; then
                ./mcvmm ctl --api-sock "$name.sock" status || true
                # Where the test host's VMRUN is: a vCPU found there holds the host's
                # registers (stuck_vcpu in tests/src/guest.rs).
                echo "test_host_svm_vcpu_run=$(awk '$3 == "__svm_vcpu_run" {print $1; exit}' /proc/kallsyms 2>/dev/null)"
                for look in 1 2 3; do ./mcvmm ctl --api-sock "$name.sock" vcpus || true; done
            fi
            ip netns exec "$name" ip -s link show gtap || true
        } >&2
    fi
    return $rc
}

# Waits for mcvmm (a child of this shell: start and stop run in one command) and prints
# its exit status as "mcvmm exit status N".
wait_exit() {
    rc=0
    wait "$(cat "$1.pid")" || rc=$?
    echo "mcvmm exit status $rc"
}

# Asks the guest to end, waits for mcvmm, prints its status and log. A guest that does not
# end cleanly fails the script, so that its console is kept as evidence and the retry
# policy reads how it ended.
stop_guest() {
    name=$1
    agent "$name" shutdown || return 1
    wait_exit "$name"
    cat "$name.log"
    if [ "$rc" != 0 ]; then
        echo "$name did not end cleanly; the end of its console:"
        tail -20 "$name.console"
        return 1
    fi
    ip netns del "$name"
}

# A replicating primary and its secondary in namespace NAME, both on this host: each has
# its own tap on a bridge whose host side (10.99.0.1) is the client; they talk over the
# namespace's loopback. Disk lists are comma-separated. The primary is NAME (NAME.pid,
# NAME.sock, NAME.log, NAME.console), the secondary NAME.s (NAME.s.pid, NAME.s.sock, ...).
start_pair() {
    name=$1 mem=$2 pdisks=$3 sdisks=$4; shift 4
    ip netns add "$name" || return 1
    started_guests="$started_guests $name"
    ns="ip netns exec $name"
    $ns ip link set lo up
    $ns ip link add rbr type bridge
    $ns ip addr add 10.99.0.1/24 dev rbr
    $ns ip link set rbr up
    for t in ptap stap; do
        $ns ip tuntap add dev $t mode tap
        $ns ip link set $t master rbr
        $ns ip link set $t up
    done
    sargs="" pargs=""
    for d in $(echo "$sdisks" | tr , ' '); do sargs="$sargs --disk $d"; done
    for d in $(echo "$pdisks" | tr , ' '); do pargs="$pargs --disk $d"; done
    phase boot
    # shellcheck disable=SC2086
    $ns ./mcvmm run --secondary --listen 127.0.0.1:7777 $sargs --tap stap \
        --serial "$name.s.console" --api-sock "$name.s.sock" >"$name.s.log" 2>&1 &
    echo $! >"$name.s.pid"
    # shellcheck disable=SC2086
    $ns ./mcvmm run --kernel guest/vmlinux --initrd guest/initrd.img --mem-mib "$mem" \
        --cmdline "${CMDLINE:-panic=-1 mcvmm.ip=10.99.0.2/24}" $pargs --tap ptap \
        --serial "$name.console" --api-sock "$name.sock" --primary --peer 127.0.0.1:7777 "$@" \
        >"$name.log" 2>&1 &
    echo $! >"$name.pid"
    if $ns ./agentctl --addr 10.99.0.2:7000 --wait 60 ping; then
        phase protected
        return 0
    fi
    echo "guest $name did not answer; primary log:"; cat "$name.log"
    echo "secondary log:"; cat "$name.s.log"; tail -20 "$name.console"
    return 1
}

# Waits (up to 90 s by the clock: each status call itself takes a while on a nested
# test host, so counting polls could outlast the test's own limit and leave it silent)
# until NAME's primary says the guest is protected. Otherwise prints both sides' status
# and logs and fails.
wait_protected() {
    deadline=$(( $(now_ms) + 90000 ))
    while [ "$(now_ms)" -lt $deadline ]; do
        if ./mcvmm ctl --api-sock "$1.sock" status 2>/dev/null | grep -q '"protected": true'; then
            return 0
        fi
        sleep 0.1
    done
    echo "$1 never became protected within 90 s; primary status:"
    ./mcvmm ctl --api-sock "$1.sock" status
    echo "secondary status:"; ./mcvmm ctl --api-sock "$1.s.sock" status
    echo "--- primary log"; cat "$1.log"; echo "--- secondary log"; cat "$1.s.log"
    echo "--- primary console"; tail -20 "$1.console"
    return 1
}

# Milliseconds since boot (10 ms resolution; busybox date has no %N).
now_ms() { awk '{ printf "%d\n", $1 * 1000 }' /proc/uptime; }
