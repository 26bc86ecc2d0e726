//! The soak's protected cases: a pair of mcvmm on one test host (two nodes, `a` and `b`,
//! each with a tap on one bridge, the link over the namespace's loopback), the guest
//! running its memory workload, and [`CYCLES`] cycles of losing one side and protecting
//! the guest again with a new secondary on the node that was lost.
//!
//! With takeovers, the primary is killed: the secondary takes over and the guest goes on
//! from its last checkpoint, then is protected again. Without, the secondary is killed:
//! the guest that booted goes on, unprotected, and is protected again. Everything else is
//! the same, so a difference between the two is what a takeover adds.
//!
//! QEMU's side of it (`qemu_script`): the guest migrated into a file again and again,
//! each time going on in a new QEMU from that file. Each cycle copies a guest that was
//! restored, with the dirty log on while it runs, and restores it: what a takeover and
//! the protection after it do, without the epochs.

use super::{GUEST_MIB, WORKLOAD_MIB, WORKLOAD_PAGES_PER_SEC};

const NS: &str = "ip netns exec sk";
const CMDLINE: &str = "panic=-1 mcvmm.ip=10.99.0.2/24";

/// Losses and protections again in one run.
pub const CYCLES: u32 = 6;
/// Seconds each protection holds, under epochs, before the next loss.
pub const HOLD_SECS: u32 = 3;

/// The test host script of one run; the same sections as the other cases' (see
/// [`super::classify`]): `== pauses` holds a line per cycle.
pub fn script(takeovers: bool) -> String {
    let (ns, cmdline) = (NS, CMDLINE);
    let lose = if takeovers {
        // The guest answers from the secondary's node once it took over.
        "kill -9 $(cat sk.$p.pid); wait $(cat sk.$p.pid) 2>/dev/null
         t=$p; p=$s; s=$t
         $a --wait 30 ping >/dev/null || { echo \"cycle $c: the guest did not answer after the takeover\"; return 1; }
         echo \"cycle $c: took over on $p\""
    } else {
        "kill -9 $(cat sk.$s.pid); wait $(cat sk.$s.pid) 2>/dev/null
         i=0; while ./mcvmm ctl --api-sock sk.$p.sock status 2>/dev/null | grep -q '\"protected\": true'; do
           i=$((i+1)); [ $i -lt 150 ] || { echo \"cycle $c: still protected 30 s after its secondary died\"; return 1; }
           sleep 0.2; done
         echo \"cycle $c: secondary lost, $p goes on\""
    };
    let look = format!(
        "{}\nfor i in 1 2 3; do timeout 10 ./mcvmm ctl --api-sock sk.$p.sock vcpus; done",
        crate::guest::HOST_VMRUN_LINE
    );
    format!(
        "# (ip by its path: busybox's timeout would run its own ip applet, which has no netns.)
a=\"$(command -v ip) netns exec sk ./agentctl --addr 10.99.0.2:7000\"
ip netns del sk 2>/dev/null; rm -f sk.*
ip netns add sk && {ns} ip link set lo up && {ns} ip link add rbr type bridge &&
  {ns} ip addr add 10.99.0.1/24 dev rbr && {ns} ip link set rbr up || exit 9
for t in atap btap; do
  {ns} ip tuntap add dev $t mode tap && {ns} ip link set $t master rbr && {ns} ip link set $t up || exit 9
done
port=7700
# A secondary on node $1, on a port of its own; returns once its control socket answers.
secondary() {{
  port=$((port+1))
  {ns} ./mcvmm run --secondary --listen 127.0.0.1:$port --tap ${{1}}tap --serial sk.$1.console \\
    --api-sock sk.$1.sock >>sk.$1.log 2>&1 &
  echo $! >sk.$1.pid
  i=0; until ./mcvmm ctl --api-sock sk.$1.sock status >/dev/null 2>&1; do
    i=$((i+1)); [ $i -lt 300 ] || {{ echo \"the secondary on $1 did not come up\"; return 1; }}; sleep 0.1; done
}}
# Until node $1 reports the guest protected (100 s).
protected() {{
  i=0; until ./mcvmm ctl --api-sock sk.$1.sock status 2>/dev/null | grep -q '\"protected\": true'; do
    i=$((i+1)); [ $i -lt 500 ] || {{ echo \"$1 not protected in 100 s\"; return 1; }}
    kill -0 $(cat sk.$1.pid) 2>/dev/null || {{ echo \"$1's mcvmm ended\"; return 1; }}
    sleep 0.2; done
}}
cycles() {{
  c=0
  while [ $c -lt {CYCLES} ]; do
    c=$((c+1))
    sleep {HOLD_SECS}
    {lose}
    secondary $s || return 1
    ./mcvmm ctl --api-sock sk.$p.sock protect 127.0.0.1:$port | grep -q '\"ok\": true' || {{
      echo \"cycle $c: protect refused\"; return 1; }}
    protected $p || return 1
    echo \"cycle $c: protected again ($(grep 'initial sync done' sk.$p.log | tail -1 | sed 's/^mcvmm: //'))\"
  done
}}
end() {{ for n in a b; do kill -9 $(cat sk.$n.pid 2>/dev/null) 2>/dev/null; done; wait; ip netns del sk; }}
dump() {{
  echo '== vmm'
  if kill -0 $(cat sk.$p.pid) 2>/dev/null; then echo vmm_alive=1; else echo vmm_alive=0; fi
  echo '== look'; {look} 2>&1
  for n in a b; do echo \"== log $n\"; tail -40 sk.$n.log; done
  echo '== console'; tail -60 sk.$p.console; }}
p=a s=b
secondary b || {{ echo '== no boot'; dump; end; exit 3; }}
{ns} ./mcvmm run --kernel guest/vmlinux --initrd guest/initrd.img --vcpus 2 --mem-mib {GUEST_MIB} \\
  --cmdline '{cmdline}' --tap atap --serial sk.a.console --api-sock sk.a.sock \\
  --primary --peer 127.0.0.1:$port >sk.a.log 2>&1 &
echo $! >sk.a.pid
{}",
        run(
            "protected a || { echo '== no protection'; dump; end; exit 4; }",
            "sk.$p.pid"
        ),
    )
}

/// QEMU's cycles (see the module's comment), with the same sections.
pub fn qemu_script() -> String {
    let (ns, cmdline) = (NS, CMDLINE);
    format!(
        "a=\"$(command -v ip) netns exec sk ./agentctl --addr 10.99.0.2:7000\"
ip netns del sk 2>/dev/null; rm -f sk.*
ip netns add sk && {ns} ip link set lo up && {ns} ip tuntap add dev gtap mode tap &&
  {ns} ip addr add 10.99.0.1/24 dev gtap && {ns} ip link set gtap up || exit 9
# A QEMU for the guest; with an argument, it goes on from the state in sk.state.
qemu() {{
  rm -f sk.qmp
  if [ -n \"${{1:-}}\" ]; then set -- -incoming 'exec:cat sk.state'; fi
  {ns} qemu-system-x86_64 -M microvm,acpi=off -accel kvm -cpu host -m {GUEST_MIB} -smp 2 \\
    -nodefaults -no-user-config -display none -no-reboot \\
    -chardev file,id=con,path=sk.console,append=on -serial chardev:con \\
    -kernel guest/vmlinux -initrd guest/initrd.img -qmp unix:sk.qmp,server=on,wait=off \\
    -netdev tap,id=n0,ifname=gtap,script=no,downscript=no -device virtio-net-device,netdev=n0 \\
    -append 'console=ttyS0 reboot=t acpi=off {cmdline}' \"$@\" >>sk.log 2>&1 &
  echo $! >sk.pid
  i=0; until [ -S sk.qmp ]; do i=$((i+1)); [ $i -lt 200 ] || return 1; sleep 0.05; done
}}
cycles() {{
  c=0
  while [ $c -lt {CYCLES} ]; do
    c=$((c+1))
    sleep {HOLD_SECS}
    ./mcvmm-qmp-pacer --qmp sk.qmp --migrate-to sk.state || {{ echo \"cycle $c: the migration failed\"; return 1; }}
    kill -9 $(cat sk.pid); wait $(cat sk.pid) 2>/dev/null
    qemu restore || {{ echo \"cycle $c: no QEMU to restore into\"; return 1; }}
    $a --wait 30 ping >/dev/null || {{ echo \"cycle $c: the guest did not answer after the restore\"; return 1; }}
    echo \"cycle $c: restored\"
  done
}}
end() {{ kill -9 $(cat sk.pid 2>/dev/null) 2>/dev/null; wait; rm -f sk.state; ip netns del sk; }}
dump() {{
  echo '== vmm'
  # A QEMU whose guest reset itself closes its monitor first and exits a moment later.
  i=0; while kill -0 $(cat sk.pid) 2>/dev/null && [ ! -S sk.qmp ] && [ $i -lt 50 ]; do i=$((i+1)); sleep 0.1; done
  if kill -0 $(cat sk.pid) 2>/dev/null; then echo vmm_alive=1; else wait $(cat sk.pid); echo \"vmm_alive=0 vmm_status=$?\"; fi
  echo '== look'; timeout 20 ./mcvmm-qmp-pacer --qmp sk.qmp --look 2>&1
  echo '== log'; tail -40 sk.log; echo '== console'; tail -60 sk.console; }}
qemu || {{ echo '== no boot'; dump; end; exit 3; }}
{}",
        run("", "sk.pid"),
    )
}

/// The part of a run after its VMM started (`dump`, `end` and `cycles` defined): the
/// boot, the workload, `before` (what must hold before the cycles), the cycles and the
/// check of the guest's memory; `pid` names the file with the pid of the VMM that runs
/// the guest at the end.
fn run(before: &str, pid: &str) -> String {
    format!(
        "if ! $a --wait 60 ping >/dev/null; then echo '== no boot'; dump; end; exit 3; fi
timeout 60 $a mem-start {WORKLOAD_MIB} {WORKLOAD_PAGES_PER_SEC} >/dev/null || {{ echo '== no workload'; dump; end; exit 4; }}
{before}
echo '== pauses'
cycles 2>&1; rc=$?
echo \"pauses_rc=$rc\"
[ $rc = 0 ] || {{ dump; end; exit 7; }}
echo '== verify'
if ! timeout 60 $a mem-verify 2>&1; then echo 'verify_rc=1'; dump; end; exit 5; fi
if ! kill -0 $(cat {pid}) 2>/dev/null; then echo '== vmm exited'; dump; end; exit 6; fi
end"
    )
}

/// The last cycle line of a run's output: where in its cycles it was lost.
pub fn last_cycle(stdout: &str) -> Option<&str> {
    stdout.lines().rev().find(|l| l.starts_with("cycle "))
}
