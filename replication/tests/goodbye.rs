//! The primary's side of an orderly end, over a real TCP connection on loopback: a goodbye
//! is the last frame and the connection closes after it; a lost secondary is told it was
//! dropped; a fenced link keeps the output it holds.

use std::io::BufReader;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mcvmm_checkpoint::seams::OutputGate;
use mcvmm_replication::gate::HeldOutput;
use mcvmm_replication::messages::{self, Farewell, Goodbye};
use mcvmm_replication::primary::{self, Link, PageCoding};
use mcvmm_replication::secondary;
use mcvmm_replication::wire::{self, Kind, WireError};

struct Pair {
    link: Arc<Link>,
    gate: Arc<HeldOutput>,
    sent: Arc<Mutex<Vec<Vec<u8>>>>,
    secondary: TcpStream,
    stop_beats: Arc<AtomicBool>,
}

/// A link whose secondary end answers with heartbeats (so it is not lost by silence).
fn pair(fenced: bool) -> Pair {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (secondary, _) = listener.accept().expect("accept");
    let sent = Arc::new(Mutex::new(Vec::new()));
    let s = sent.clone();
    let gate = Arc::new(HeldOutput::new(Box::new(move |f: &[u8]| {
        s.lock().expect("lock").push(f.to_vec());
        Ok(f.len())
    })));
    let coding = PageCoding {
        lz4: false,
        delta_cache_mib: 0,
    };
    let link = primary::start(
        client,
        "test",
        gate.clone(),
        Duration::from_secs(2),
        coding,
        fenced,
    )
    .expect("start");
    let stop_beats = Arc::new(AtomicBool::new(false));
    let replies = Arc::new(Mutex::new(secondary.try_clone().expect("clone")));
    secondary::heartbeats(replies, Duration::from_millis(20), stop_beats.clone());
    Pair {
        link,
        gate,
        sent,
        secondary,
        stop_beats,
    }
}

/// The frames the secondary end reads until the connection closes (or 5 s of silence).
fn frames_until_closed(s: &TcpStream) -> (Vec<Kind>, Option<Farewell>, WireError) {
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut r = BufReader::new(s.try_clone().expect("clone"));
    let mut kinds = Vec::new();
    let mut why = None;
    let mut payload = Vec::new();
    loop {
        match wire::read_frame(&mut r, &mut payload) {
            Ok(h) => {
                if h.kind == Kind::Goodbye {
                    let g: Goodbye = messages::decode(&h, &payload).expect("a goodbye");
                    why = Some(g.why);
                }
                kinds.push(h.kind);
            }
            Err(e) => return (kinds, why, e),
        }
    }
}

#[test]
fn a_goodbye_is_the_last_frame_and_the_connection_closes_after_it() {
    let p = pair(false);
    std::thread::sleep(Duration::from_millis(150));
    assert!(p.link.goodbye(Farewell::Stopped, Duration::from_secs(2)));
    assert!(p.link.said_goodbye() && p.link.is_lost());
    let (kinds, why, end) = frames_until_closed(&p.secondary);
    assert_eq!(why, Some(Farewell::Stopped));
    assert_eq!(kinds.last(), Some(&Kind::Goodbye), "{kinds:?}");
    assert!(matches!(end, WireError::Closed), "{end:?}");
    assert!(
        !p.link.goodbye(Farewell::Stopped, Duration::from_millis(10)),
        "said once"
    );
    p.stop_beats
        .store(true, std::sync::atomic::Ordering::SeqCst);
}

#[test]
fn a_lost_secondary_is_told_it_was_dropped_and_held_output_goes_only_without_a_fence() {
    for fenced in [false, true] {
        let p = pair(fenced);
        p.gate.hold_from(1);
        assert!(p.gate.hold(b"frame of epoch 1"));
        p.link.lose("a test drops it");
        let (_, why, _) = frames_until_closed(&p.secondary);
        assert_eq!(why, Some(Farewell::SecondaryDropped), "fenced: {fenced}");
        let released = p.sent.lock().expect("lock").len();
        assert_eq!(released, usize::from(!fenced), "fenced: {fenced}");
        p.stop_beats
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}
