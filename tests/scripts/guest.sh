# Shell helpers for integration tests, sourced on a KVM host (in /work of a lab test host
# or the local work folder). Each guest gets a network namespace of its own with a tap,
# so tests never see each other's guests, and everything goes with the namespace.
#
#   start_guest NAME KERNEL VCPUS MEM_MIB [mcvmm args...]   boots; waits for the agent
#                                                  ($CMDLINE replaces the kernel command line)
#   agent NAME ARGS...                                       mcvmm-agentctl against it
#   stop_guest NAME                                          SHUTDOWN; waits; prints rc
set -u

guest_ip() { echo "10.99.0.2"; }

start_guest() {
    name=$1 kernel=$2 cpus=$3 mem=$4; shift 4
    ip netns add "$name" || return 1
    ip netns exec "$name" ip link set lo up
    ip netns exec "$name" ip tuntap add dev gtap mode tap
    ip netns exec "$name" ip addr add 10.99.0.1/24 dev gtap
    ip netns exec "$name" ip link set gtap up
    ip netns exec "$name" ./mcvmm run --kernel "guest/$kernel" --initrd guest/initrd.img \
        --vcpus "$cpus" --mem-mib "$mem" --cmdline "${CMDLINE:-panic=-1 mcvmm.ip=10.99.0.2/24}" \
        --tap gtap --serial "$name.console" --api-sock "$name.sock" "$@" >"$name.log" 2>&1 &
    echo $! >"$name.pid"
    if ! ip netns exec "$name" ./agentctl --addr 10.99.0.2:7000 --wait 60 ping; then
        echo "guest $name did not answer; mcvmm log:"; cat "$name.log"; tail -20 "$name.console"
        return 1
    fi
}

agent() {
    name=$1; shift
    rc=0
    ip netns exec "$name" ./agentctl --addr 10.99.0.2:7000 "$@" || rc=$?
    if [ $rc -ne 0 ]; then
        echo "agent $* failed ($rc); guest console:"; tail -20 "$name.console"; echo "mcvmm:"; cat "$name.log"
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

# Asks the guest to end, waits for mcvmm, prints its status and log.
stop_guest() {
    name=$1
    agent "$name" shutdown || return 1
    wait_exit "$name"
    cat "$name.log"
    ip netns del "$name"
}
