//! The secondary's receiver against streams written the way a primary writes them, and
//! against streams that go wrong: a checkpoint commits whole or not at all.

use std::fs::File;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mcvmm_checkpoint::snapshot::memory_digest;
use mcvmm_checkpoint::state::{DiskShape, MachineState, VmShape, FORMAT_VERSION};
use mcvmm_checkpoint::{GuestMemory, PAGE_SIZE};
use mcvmm_replication::delta::SentPages;
use mcvmm_replication::disk::{Disks, Replica};
use mcvmm_replication::messages::{
    self, disk_header, pages_header, End, Farewell, Goodbye, Hello, PageEncoding, PROTOCOL_VERSION,
};
use mcvmm_replication::secondary::{
    check_hello, Ended, Expect, Patient, Progress, ReceiveError, Receiver,
};
use mcvmm_replication::wire::{self, Kind, WireError};
use vm_memory::{Bytes, GuestAddress};

const MEM: usize = 1 << 20;
const DISK: u64 = 64 << 10;

fn state(tag: &str) -> MachineState {
    MachineState {
        cmdline: tag.into(),
        ..MachineState::default()
    }
}

struct Side {
    _dir: tempfile::TempDir,
    rx: Receiver,
    disk_path: std::path::PathBuf,
}

fn secondary() -> Side {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk_path = dir.path().join("disk");
    File::create(&disk_path)
        .and_then(|f| f.set_len(DISK))
        .expect("disk");
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM)]).expect("memory");
    let disks = Disks::new(vec![Replica::open(&disk_path).expect("replica")]);
    let rx = Receiver::new(mem, disks, Arc::new(Mutex::new(Progress::default())));
    Side {
        _dir: dir,
        rx,
        disk_path,
    }
}

/// A stream as a primary writes it.
#[derive(Default)]
struct Stream(Vec<u8>);

impl Stream {
    fn frame(&mut self, kind: Kind, epoch: u64, parts: &[&[u8]]) -> &mut Self {
        wire::write_frame(&mut self.0, kind, epoch, parts).expect("write");
        self
    }
    fn pages(&mut self, epoch: u64, gpa: u64, fill: u8, count: u32) -> &mut Self {
        let data = vec![fill; count as usize * PAGE_SIZE as usize];
        let h = pages_header(gpa, count, PageEncoding::Raw);
        self.frame(Kind::Pages, epoch, &[&h, &data])
    }
    fn disk(&mut self, kind: Kind, epoch: u64, offset: u64, data: &[u8]) -> &mut Self {
        let h = disk_header(0, offset);
        self.frame(kind, epoch, &[&h, data])
    }
    fn state(&mut self, epoch: u64) -> &mut Self {
        let s = messages::encode(&state(&format!("epoch {epoch}")));
        self.frame(Kind::State, epoch, &[&s])
    }
    fn end(&mut self, epoch: u64, pages: u64, disk_writes: u64, digest: Option<u64>) -> &mut Self {
        let e = messages::encode(&End {
            pages,
            disk_writes,
            memory_digest: digest,
            disk_digests: None,
        });
        self.frame(Kind::End, epoch, &[&e])
    }
    /// Initial sync of one page and one disk chunk, then epoch 1: a disk write, two pages.
    fn synced_and_epoch_one() -> Stream {
        let mut s = Stream::default();
        s.pages(0, 0, 0x11, 1)
            .disk(Kind::DiskChunk, 0, 0, &[0xAA; 4096])
            .disk(Kind::DiskWrite, 1, 100, b"epoch one")
            .frame(Kind::SyncDone, 0, &[])
            .frame(Kind::Begin, 1, &[])
            .pages(1, 0x2000, 0x22, 2)
            .state(1)
            .end(1, 2, 1, None);
        s
    }
}

fn run(side: &mut Side, bytes: &[u8]) -> (Ended, Vec<u8>) {
    let replies = Mutex::new(Vec::new());
    let ended = side
        .rx
        .run(&mut &bytes[..], &replies, Duration::from_secs(1));
    (ended, replies.into_inner().expect("replies"))
}

fn byte(side: &Side, gpa: u64) -> u8 {
    side.rx.mem.read_obj(GuestAddress(gpa)).expect("read")
}

fn disk(side: &Side) -> Vec<u8> {
    std::fs::read(&side.disk_path).expect("disk")
}

fn acks(replies: &[u8]) -> Vec<u64> {
    let mut out = Vec::new();
    let mut r = replies;
    let mut payload = Vec::new();
    while let Ok(h) = wire::read_frame(&mut r, &mut payload) {
        assert_eq!(h.kind, Kind::Ack);
        out.push(h.epoch);
    }
    out
}

#[test]
fn a_whole_checkpoint_commits_memory_disk_and_state_and_is_acked() {
    let mut side = secondary();
    let s = Stream::synced_and_epoch_one();
    let (ended, replies) = run(&mut side, &s.0);
    assert!(matches!(ended, Ended::Closed(_)), "{ended:?}");
    assert_eq!(acks(&replies), vec![1]);
    assert_eq!(side.rx.committed(), 1);
    assert_eq!(byte(&side, 0), 0x11);
    assert_eq!(byte(&side, 0x2000), 0x22);
    assert_eq!(byte(&side, 0x3fff), 0x22);
    let d = disk(&side);
    assert_eq!(d[0], 0xAA);
    assert_eq!(&d[100..109], b"epoch one");
    assert_eq!(
        side.rx.take_state().map(|s| s.cmdline),
        Some("epoch 1".into())
    );
}

#[test]
fn an_epoch_cut_short_leaves_the_committed_checkpoint_alone() {
    let mut side = secondary();
    let mut s = Stream::synced_and_epoch_one();
    s.disk(Kind::DiskWrite, 2, 0, b"never")
        .frame(Kind::Begin, 2, &[])
        .pages(2, 0x2000, 0x33, 1)
        .state(2);
    let (ended, replies) = run(&mut side, &s.0);
    assert!(
        matches!(ended, Ended::Closed(ReceiveError::Wire(WireError::Closed))),
        "{ended:?}"
    );
    assert_eq!(acks(&replies), vec![1]);
    assert_eq!(side.rx.committed(), 1);
    assert_eq!(byte(&side, 0x2000), 0x22, "epoch 2's page stays out");
    assert_eq!(disk(&side)[0], 0xAA, "epoch 2's write stays out");
    assert_eq!(side.rx.disks.held_bytes(), 0, "and is thrown away");
}

/// Epoch 2 of a good stream, with `bad` frames spliced in before its end.
fn refused_epoch_two(bad: impl FnOnce(&mut Stream)) -> (Side, Ended) {
    let mut side = secondary();
    let mut s = Stream::synced_and_epoch_one();
    s.disk(Kind::DiskWrite, 2, 0, b"never")
        .frame(Kind::Begin, 2, &[])
        .pages(2, 0x2000, 0x33, 1);
    bad(&mut s);
    s.state(2).end(2, 1, 1, None);
    let (ended, replies) = run(&mut side, &s.0);
    assert_eq!(acks(&replies), vec![1], "{ended:?}");
    assert_eq!(side.rx.committed(), 1);
    assert_eq!(byte(&side, 0x2000), 0x22, "nothing of epoch 2 applied");
    assert_eq!(disk(&side)[0], 0xAA);
    (side, ended)
}

#[test]
fn a_corrupted_frame_drops_the_connection_and_its_epoch() {
    let (_, ended) = refused_epoch_two(|s| {
        s.pages(2, 0x5000, 0x44, 1);
        let n = s.0.len();
        s.0[n - 100] ^= 0x10;
    });
    assert!(
        matches!(
            ended,
            Ended::Refused(ReceiveError::Wire(WireError::Checksum { .. }))
        ),
        "{ended:?}"
    );
}

#[test]
fn pages_outside_guest_memory_are_refused() {
    let (_, ended) = refused_epoch_two(|s| {
        s.pages(2, MEM as u64 - PAGE_SIZE, 0x44, 2);
    });
    assert!(
        matches!(ended, Ended::Refused(ReceiveError::OutsideMemory { .. })),
        "{ended:?}"
    );
    let (_, ended) = refused_epoch_two(|s| {
        s.pages(2, u64::MAX - PAGE_SIZE + 1, 0x44, 1);
    });
    assert!(
        matches!(ended, Ended::Refused(ReceiveError::OutsideMemory { .. })),
        "{ended:?}"
    );
}

#[test]
fn a_disk_write_past_the_end_is_refused() {
    let (_, ended) = refused_epoch_two(|s| {
        s.disk(Kind::DiskWrite, 2, DISK - 2, b"xyz");
    });
    assert!(
        matches!(ended, Ended::Refused(ReceiveError::Disk(_))),
        "{ended:?}"
    );
}

#[test]
fn a_checkpoint_with_missing_pages_is_refused() {
    let mut side = secondary();
    let mut s = Stream::synced_and_epoch_one();
    s.frame(Kind::Begin, 2, &[])
        .pages(2, 0x2000, 0x33, 1)
        .state(2)
        .end(2, 2, 0, None);
    let (ended, _) = run(&mut side, &s.0);
    assert!(
        matches!(ended, Ended::Refused(ReceiveError::Count { .. })),
        "{ended:?}"
    );
    assert_eq!(byte(&side, 0x2000), 0x22);
}

#[test]
fn frames_out_of_order_are_refused() {
    for bad in [
        |s: &mut Stream| {
            s.frame(Kind::Begin, 3, &[]);
        },
        |s: &mut Stream| {
            s.pages(0, 0, 1, 1);
        },
        |s: &mut Stream| {
            s.frame(Kind::Hello, 0, &[]);
        },
        |s: &mut Stream| {
            s.disk(Kind::DiskWrite, 1, 0, b"late");
        },
    ] {
        let mut side = secondary();
        let mut s = Stream::synced_and_epoch_one();
        bad(&mut s);
        let (ended, _) = run(&mut side, &s.0);
        assert!(matches!(ended, Ended::Refused(_)), "{ended:?}");
        assert_eq!(side.rx.committed(), 1);
    }
}

#[test]
fn digests_sent_with_a_checkpoint_are_checked_after_it_is_applied() {
    let mut side = secondary();
    let mut expected = secondary();
    run(&mut expected, &Stream::synced_and_epoch_one().0);
    let good = memory_digest(&expected.rx.mem);
    let mut s = Stream::synced_and_epoch_one();
    s.frame(Kind::Begin, 2, &[])
        .state(2)
        .end(2, 0, 0, Some(good));
    s.frame(Kind::Begin, 3, &[])
        .state(3)
        .end(3, 0, 0, Some(good ^ 1));
    let (_, replies) = run(&mut side, &s.0);
    assert_eq!(acks(&replies), vec![1, 2, 3]);
    let p = side.rx.progress.lock().expect("progress").clone();
    assert_eq!(p.verified_epochs, 1);
    assert_eq!(p.verify_failures, 1);
}

#[test]
fn a_takeover_comes_only_at_the_committed_epoch() {
    let mut side = secondary();
    let mut s = Stream::synced_and_epoch_one();
    s.frame(Kind::Takeover, 1, &[]);
    assert!(matches!(run(&mut side, &s.0).0, Ended::Takeover(1)));
    let mut side = secondary();
    let mut s = Stream::synced_and_epoch_one();
    s.frame(Kind::Takeover, 2, &[]);
    assert!(matches!(run(&mut side, &s.0).0, Ended::Refused(_)));
}

#[test]
fn handshakes_that_do_not_fit_are_refused_with_the_reason() {
    let side = secondary();
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        state_format: FORMAT_VERSION,
        shape: VmShape {
            mem_mib: 1,
            vcpus: 1,
            disks: vec![DiskShape {
                size_bytes: DISK,
                read_only: false,
            }],
            net: None,
        },
        generation: 1,
        chunk_bytes: 1 << 20,
    };
    let expect = |generation, has_tap| Expect {
        disk_sizes: vec![DISK],
        has_tap,
        generation,
        disks: &side.rx.disks,
    };
    let accept = check_hello(&hello, &expect(1, false)).expect("fits");
    assert_eq!(accept.disk_digests.len(), 1);
    let refused = |h: &Hello, e: &Expect| check_hello(h, e).expect_err("refused").0;
    let mut h = hello.clone();
    h.protocol = 99;
    assert!(refused(&h, &expect(1, false)).contains("protocol version 99"));
    assert!(refused(&hello, &expect(2, false)).contains("stale primary"));
    let mut h = hello.clone();
    h.shape.disks[0].size_bytes = DISK * 2;
    assert!(refused(&h, &expect(1, false)).contains("disk 1"));
    let mut h = hello.clone();
    h.shape.net = Some([2, 0, 0, 0, 0, 1]);
    assert!(refused(&h, &expect(1, false)).contains("--tap"));
    let mut h = hello.clone();
    h.shape.disks.clear();
    assert!(refused(&h, &expect(1, false)).contains("disks"));
}

/// A page filled with `fill`, and the same page with `bytes` written at `at`.
fn page_and_changed(fill: u8, at: usize, bytes: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let base = vec![fill; PAGE_SIZE as usize];
    let mut new = base.clone();
    new[at..at + bytes.len()].copy_from_slice(bytes);
    (base, new)
}

/// A delta run of one page at `gpa`: `new` encoded against `base`.
fn delta_run(s: &mut Stream, epoch: u64, gpa: u64, base: &[u8], new: &[u8]) {
    let mut sent = SentPages::new(1);
    sent.put(gpa, base);
    let (mut xor, mut out) = (Vec::new(), Vec::new());
    assert!(sent.encode(gpa, new, &mut xor, &mut out), "worth a delta");
    let h = pages_header(gpa, 1, PageEncoding::Delta);
    s.frame(Kind::Pages, epoch, &[&h, &out]);
}

#[test]
fn a_delta_run_is_rebuilt_from_the_committed_page() {
    let mut side = secondary();
    let mut s = Stream::synced_and_epoch_one();
    let (base, new) = page_and_changed(0x22, 10, b"abcd");
    s.frame(Kind::Begin, 2, &[]);
    delta_run(&mut s, 2, 0x2000, &base, &new);
    s.state(2).end(2, 1, 0, None);
    let (_, replies) = run(&mut side, &s.0);
    assert_eq!(acks(&replies), vec![1, 2]);
    let mut got = vec![0u8; PAGE_SIZE as usize];
    side.rx
        .mem
        .read_slice(&mut got, GuestAddress(0x2000))
        .expect("read");
    assert_eq!(got, new);
    assert_eq!(
        byte(&side, 0x3000),
        0x22,
        "the page next to it is untouched"
    );
}

#[test]
fn a_delta_against_another_base_is_refused() {
    let (base, new) = page_and_changed(0x23, 0, &[0]);
    let (_, ended) = refused_epoch_two(|s| delta_run(s, 2, 0x3000, &base, &new));
    assert!(format!("{ended:?}").contains("checksum"), "{ended:?}");
}

#[test]
fn a_delta_run_in_the_initial_sync_is_refused() {
    let mut side = secondary();
    let mut s = Stream::default();
    let (base, new) = page_and_changed(0, 1, &[9]);
    delta_run(&mut s, 0, 0x1000, &base, &new);
    let (ended, _) = run(&mut side, &s.0);
    assert!(format!("{ended:?}").contains("initial sync"), "{ended:?}");
    assert_eq!(byte(&side, 0x1001), 0, "nothing written");
}

#[test]
fn a_goodbye_ends_the_stream_and_drops_the_epoch_in_progress() {
    let mut side = secondary();
    let mut s = Stream::synced_and_epoch_one();
    let bye = messages::encode(&Goodbye {
        why: Farewell::Unprotected,
    });
    s.frame(Kind::Begin, 2, &[])
        .pages(2, 0x2000, 0x33, 1)
        .frame(Kind::Goodbye, 0, &[&bye])
        .frame(Kind::Heartbeat, 0, &[]);
    let (ended, replies) = run(&mut side, &s.0);
    assert!(
        matches!(ended, Ended::Goodbye(Farewell::Unprotected)),
        "{ended:?}"
    );
    assert_eq!(acks(&replies), vec![1]);
    assert_eq!(side.rx.committed(), 1);
    assert_eq!(
        byte(&side, 0x2000),
        0x22,
        "epoch 2 never ended: not applied"
    );
    let mut bad = Stream::default();
    bad.frame(Kind::Goodbye, 0, &[b"\x09\0\0\0"]);
    let mut side = secondary();
    assert!(matches!(run(&mut side, &bad.0).0, Ended::Refused(_)));
}

/// A reader that gives `chunks` one at a time, `polls` silent polls (`WouldBlock`
/// after 2 ms) before each.
struct Stuttering {
    chunks: Vec<Vec<u8>>,
    polls: u32,
    silent_left: u32,
    /// Once the chunks are out: silent for ever (else: closed).
    end_silent: bool,
}

impl std::io::Read for Stuttering {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.silent_left > 0 {
            self.silent_left -= 1;
            std::thread::sleep(Duration::from_millis(2));
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        self.silent_left = self.polls;
        if self.chunks.is_empty() {
            if self.end_silent {
                std::thread::sleep(Duration::from_millis(2));
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            return Ok(0);
        }
        let c = self.chunks.remove(0);
        let n = c.len().min(buf.len());
        buf[..n].copy_from_slice(&c[..n]);
        if n < c.len() {
            self.chunks.insert(0, c[n..].to_vec());
        }
        Ok(n)
    }
}

#[test]
fn a_patient_reader_waits_out_silences_inside_a_frame_until_its_rule_gives_up() {
    let s = Stream::synced_and_epoch_one();
    // 1000 bytes at a time, after a silence longer than the timeout.
    let chunks: Vec<Vec<u8>> = s.0.chunks(1000).map(<[u8]>::to_vec).collect();
    let asked = Arc::new(Mutex::new(0u32));
    let a = asked.clone();
    let mut reader = Patient::new(
        Stuttering {
            chunks,
            polls: 8,
            silent_left: 8,
            end_silent: false,
        },
        Duration::from_millis(10),
        Box::new(move |silent| {
            assert!(silent >= Duration::from_millis(10));
            *a.lock().expect("lock") += 1;
            false
        }),
    );
    let mut side = secondary();
    let replies = Mutex::new(Vec::new());
    let ended = side
        .rx
        .run(&mut reader, &replies, Duration::from_millis(10));
    assert!(matches!(ended, Ended::Closed(_)), "{ended:?}");
    assert_eq!(side.rx.committed(), 1, "no frame was torn by a silence");
    assert!(*asked.lock().expect("lock") > 10);

    let mut side = secondary();
    let mut reader = Patient::new(
        Stuttering {
            chunks: vec![s.0.clone()],
            polls: 0,
            silent_left: 0,
            end_silent: true,
        },
        Duration::from_millis(10),
        Box::new(|_| true),
    );
    let ended = side.rx.run(
        &mut reader,
        &Mutex::new(Vec::new()),
        Duration::from_millis(10),
    );
    assert!(
        matches!(
            ended,
            Ended::Silent(ReceiveError::Wire(WireError::TimedOut(10)))
        ),
        "{ended:?}"
    );
    assert_eq!(side.rx.committed(), 1);
    assert!(reader.silent_for() >= Duration::from_millis(10));
}
