//! Micro-checkpoint replication against real guests on real KVM: a primary protecting a
//! guest, its secondary holding the committed checkpoints, and failover.

use mcvmm_tests::guest::{one_at_a_time, report, script};

/// The number after `key=` in `out`.
fn value(out: &str, key: &str) -> u64 {
    mcvmm_tests::drill::value(out, key).unwrap_or_else(|| panic!("no number {key}= in:\n{out}"))
}

#[test]
fn failover_after_the_primary_is_killed_keeps_every_acknowledged_write() {
    let _serial = one_at_a_time();
    let out = script(
        "truncate -s 32M fa1.img fa2.img fb1.img fb2.img
         start_pair fo 128 fa1.img,fa2.img fb1.img,fb2.img
         wait_protected fo
         agent fo mem-start 16 2000
         agent fo records vda 1 50
         # The self-check rides on the primary's own epochs: the dirty sets the
         # checkpoints are made of miss no page.
         echo '== selfcheck'; ./mcvmm ctl --api-sock fo.sock selfcheck 40 20
         echo '== verify'; ./mcvmm ctl --api-sock fo.sock verify
         # The digests ride on the next checkpoint; under the memory workload an epoch
         # can take a while to commit. Wait for the comparison (20 s at most).
         i=0; until ./mcvmm ctl --api-sock fo.s.sock status | grep -q '\"verified_epochs\": [1-9]' || [ $i -gt 200 ]; do sleep 0.1; i=$((i+1)); done
         echo '== primary'; ./mcvmm ctl --api-sock fo.sock status
         echo '== secondary'; ./mcvmm ctl --api-sock fo.s.sock status
         # Acknowledged writes go on while the primary is killed under them.
         ip netns exec fo ./agentctl --addr 10.99.0.2:7000 records-for vdb 2 8 >fo.client 2>&1 &
         client=$!
         sleep 3
         t0=$(now_ms); kill -9 $(cat fo.pid)
         ip netns exec fo ./agentctl --addr 10.99.0.2:7000 --wait 30 ping
         echo \"failover_ms=$(( $(now_ms) - t0 ))\"
         wait $client || true
         cat fo.client
         echo '== after'; ./mcvmm ctl --api-sock fo.s.sock status
         agent fo mem-verify
         agent fo records vda 3 20
         agent fo shutdown
         rc=0; wait $(cat fo.s.pid) || rc=$?
         echo \"secondary exit status $rc\"
         cat fo.s.log
         ./agentctl check-records fb1.img 3 20
         acked=$(sed -n 's/^acknowledged=//p' fo.client)
         ./agentctl check-records fb2.img 2 $acked
         ip netns del fo",
    );
    let check = report(&out, "selfcheck");
    assert_eq!(check["on"], "replicating primary", "{check:#}");
    assert_eq!(check["epochs"], 40, "{check:#}");
    assert_eq!(check["mismatching_pages"], 0, "{check:#}");
    assert!(check["error"].is_null(), "{check:#}");
    let primary = report(&out, "primary");
    assert_eq!(primary["role"], "primary", "{primary:#}");
    assert_eq!(primary["protected"], true, "{primary:#}");
    assert!(
        primary["replication"]["last_acked_epoch"].as_u64() > Some(1),
        "{primary:#}"
    );
    // The digests below were compared after checkpoints that left out pages the dirty
    // log kept writable and found unchanged.
    assert!(
        primary["replication"]["hot_pages"]["unchanged_not_sent"].as_u64() > Some(0),
        "{primary:#}"
    );
    let secondary = report(&out, "secondary");
    assert_eq!(secondary["role"], "secondary", "{secondary:#}");
    assert!(
        secondary["progress"]["verified_epochs"].as_u64() >= Some(1),
        "the digests of memory and disks were checked at a commit: {secondary:#}"
    );
    assert_eq!(secondary["progress"]["verify_failures"], 0, "{secondary:#}");
    let after = report(&out, "after");
    assert_eq!(after["role"], "primary", "{after:#}");
    assert_eq!(after["protected"], false, "{after:#}");
    assert!(after["took_over"]["epoch"].as_u64() > Some(1), "{after:#}");
    assert!(
        out.contains("pages=4096 errors=0"),
        "memory after failover: {out}"
    );
    assert!(value(&out, "acknowledged") > 0, "{out}");
    assert!(out.contains("all 20 records present"), "{out}");
    assert_eq!(
        out.matches("records present").count(),
        2,
        "every acknowledged write is on the secondary's disks: {out}"
    );
    assert!(out.contains("secondary exit status 0"), "{out}");
    eprintln!(
        "failover: {} ms from SIGKILL to the agent answering; {} writes acknowledged during the drill (slowest {} ms); took over at epoch {}",
        value(&out, "failover_ms"),
        value(&out, "acknowledged"),
        value(&out, "slowest_ms"),
        after["took_over"]["epoch"]
    );
}

#[test]
fn losing_the_secondary_releases_held_output_and_the_primary_goes_on_unprotected() {
    let _serial = one_at_a_time();
    let out = script(
        "truncate -s 16M la.img lb.img
         start_pair sl 128 la.img lb.img
         wait_protected sl
         agent sl records vda 1 20
         t0=$(now_ms); kill -9 $(cat sl.s.pid)
         agent sl ping
         echo \"answered_ms=$(( $(now_ms) - t0 ))\"
         sleep 1
         echo '== status'; ./mcvmm ctl --api-sock sl.sock status
         agent sl records vda 2 20
         agent sl shutdown
         rc=0; wait $(cat sl.pid) || rc=$?
         echo \"primary exit status $rc\"
         cat sl.log
         ./agentctl check-records la.img 2 20
         ip netns del sl",
    );
    let status = report(&out, "status");
    assert_eq!(status["protected"], false, "{status:#}");
    assert!(status["replication"]["lost"].is_string(), "{status:#}");
    assert_eq!(
        status["replication"]["output"]["holding"], false,
        "{status:#}"
    );
    assert!(out.contains("SECONDARY LOST"), "said loudly: {out}");
    assert!(out.contains("all 20 records present"), "{out}");
    assert!(out.contains("primary exit status 0"), "{out}");
    eprintln!(
        "secondary killed: the guest answered {} ms later",
        value(&out, "answered_ms")
    );
}

#[test]
fn a_planned_switch_moves_the_guest_and_a_stale_primary_is_refused() {
    let _serial = one_at_a_time();
    let out = script(
        "truncate -s 16M pa1.img pa2.img pb1.img pb2.img
         start_pair ps 128 pa1.img,pa2.img pb1.img,pb2.img
         wait_protected ps
         agent ps mem-start 8 500
         agent ps records vda 1 30
         echo '== failover'; ./mcvmm ctl --api-sock ps.sock failover | tee ps.failover
         # A switch that did not happen leaves the old primary running: say why, not hang.
         grep -q '\"ok\": true' ps.failover || { cat ps.log ps.s.log; exit 1; }
         rc=0; wait $(cat ps.pid) || rc=$?
         echo \"old primary exit status $rc\"
         ip netns exec ps ./agentctl --addr 10.99.0.2:7000 --wait 30 ping
         echo '== after'; ./mcvmm ctl --api-sock ps.s.sock status
         agent ps mem-verify
         agent ps records vdb 2 30
         # The old primary comes back with its old generation: refused.
         truncate -s 16M pc.img
         ip netns exec ps ./mcvmm run --kernel guest/vmlinux --initrd guest/initrd.img \
             --mem-mib 128 --disk pc.img --disk pc.img --serial ps.stale.console --primary \
             --peer 127.0.0.1:7777 --peer-wait-s 5 >ps.stale.log 2>&1 \
             && echo 'STALE PRIMARY RAN' || echo \"stale primary: $(tail -1 ps.stale.log)\"
         agent ps shutdown
         rc=0; wait $(cat ps.s.pid) || rc=$?
         echo \"secondary exit status $rc\"
         cat ps.log ps.s.log
         ./agentctl check-records pb1.img 1 30
         ./agentctl check-records pb2.img 2 30
         ip netns del ps",
    );
    let failover = report(&out, "failover");
    assert_eq!(failover["ok"], true, "{out}");
    assert!(out.contains("old primary exit status 0"), "{out}");
    assert!(
        out.contains("handed the guest over to the secondary"),
        "{out}"
    );
    let after = report(&out, "after");
    assert_eq!(after["role"], "primary", "{after:#}");
    assert_eq!(
        after["took_over"]["epoch"], failover["handed_over_at_epoch"],
        "{out}"
    );
    assert!(out.contains("pages=2048 errors=0"), "{out}");
    assert!(!out.contains("STALE PRIMARY RAN"), "{out}");
    let stale = out
        .lines()
        .find(|l| l.starts_with("stale primary: "))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(stale.contains("stale primary: generation 1"), "{stale}");
    assert_eq!(out.matches("all 30 records present").count(), 2, "{out}");
    assert!(out.contains("secondary exit status 0"), "{out}");
}

#[test]
fn a_secondary_without_a_committed_checkpoint_refuses_to_take_over_and_keeps_listening() {
    let _serial = one_at_a_time();
    let out = script(
        "truncate -s 16M na.img nb.img
         ip netns add ns1; started_guests=\"$started_guests ns1\"
         ip netns exec ns1 ip link set lo up
         ip netns exec ns1 ./mcvmm run --secondary --listen 127.0.0.1:7777 --disk nb.img \
             --serial ns1.s.console >ns1.s.log 2>&1 &
         echo $! >ns1.s.pid
         # A large guest keeps the initial sync going long enough to kill it midway.
         ip netns exec ns1 ./mcvmm run --kernel guest/vmlinux --initrd guest/initrd.img \
             --mem-mib 1024 --disk na.img --serial ns1.console --primary \
             --peer 127.0.0.1:7777 >ns1.log 2>&1 &
         echo $! >ns1.pid
         i=0; until grep -q accepted ns1.s.log || [ $i -gt 500 ]; do sleep 0.02; i=$((i+1)); done
         kill -9 $(cat ns1.pid)
         i=0; until grep -q 'waiting for a primary' ns1.s.log || [ $i -gt 500 ]; do sleep 0.02; i=$((i+1)); done
         sleep 0.5
         kill -0 $(cat ns1.s.pid) && echo 'secondary still listening'
         kill -9 $(cat ns1.s.pid)
         cat ns1.s.log
         ip netns del ns1",
    );
    assert!(out.contains("secondary still listening"), "{out}");
    assert!(
        out.contains("before the first checkpoint committed"),
        "the secondary says why: {out}"
    );
    assert!(!out.contains("TOOK OVER"), "{out}");
}

#[test]
fn a_guest_started_unprotected_is_protected_later_and_its_copy_verifies() {
    let _serial = one_at_a_time();
    let out = script(
        "truncate -s 32M la.img lb.img
         start_guest lp vmlinux 1 128 --disk la.img
         # Written before protection: only the initial sync can carry these.
         agent lp records vda 1 20
         ip netns exec lp ip tuntap add dev stap mode tap
         ip netns exec lp ./mcvmm run --secondary --listen 127.0.0.1:7779 --disk lb.img \
             --tap stap --serial lp.s.console --api-sock lp.s.sock >lp.s.log 2>&1 &
         echo $! >lp.s.pid
         echo '== protect'; ./mcvmm ctl --api-sock lp.sock protect 127.0.0.1:7779
         wait_protected lp
         echo '== again'; ./mcvmm ctl --api-sock lp.sock protect 127.0.0.1:7779 && exit 1
         agent lp mem-start 16 2000
         agent lp records vda 2 10
         echo '== verify'; ./mcvmm ctl --api-sock lp.sock verify
         i=0; until ./mcvmm ctl --api-sock lp.s.sock status | grep -q '\"verified_epochs\": [1-9]' || [ $i -gt 200 ]; do sleep 0.1; i=$((i+1)); done
         echo '== primary'; ./mcvmm ctl --api-sock lp.sock status
         echo '== secondary'; ./mcvmm ctl --api-sock lp.s.sock status
         cat lp.log",
    );
    let protect = report(&out, "protect");
    assert_eq!(protect["ok"], true, "{protect:#}\n{out}");
    assert_eq!(protect["generation"], 1, "{protect:#}");
    let again = report(&out, "again");
    assert!(
        again["error"]
            .as_str()
            .is_some_and(|e| e.contains("already protected")),
        "{again:#}"
    );
    let primary = report(&out, "primary");
    assert_eq!(primary["protected"], true, "{primary:#}");
    assert!(
        primary["replication"]["sync"]["sent_bytes"].as_u64() > Some(0),
        "{primary:#}"
    );
    let secondary = report(&out, "secondary");
    assert!(
        secondary["progress"]["verified_epochs"].as_u64() >= Some(1),
        "memory and disk digests were compared at a commit: {secondary:#}\n{out}"
    );
    assert_eq!(secondary["progress"]["verify_failures"], 0, "{secondary:#}");
    assert!(
        out.contains("protecting the guest: connecting to a secondary at 127.0.0.1:7779"),
        "the log says what happened: {out}"
    );
}
