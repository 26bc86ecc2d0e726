//! virtio-blk against requests a misbehaving guest can post: descriptors outside guest
//! memory, looping chains, wrong directions, sectors past the end. Each fails alone with
//! an I/O error; the device goes on serving good requests.

use std::sync::Arc;

use mcvmm_devices::interrupt::{CountingLine, Interrupt};
use mcvmm_devices::virtio::block::Block;
use mcvmm_devices::virtio::VirtioDevice;
use mcvmm_devices::GuestMemory;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const QSIZE: u16 = 16;
const NEXT: u16 = 1;
const WRITE: u16 = 2;

struct Rig {
    mem: GuestMemory,
    queues: Vec<Queue>,
    dev: Block,
    irq: Arc<Interrupt>,
    disk: std::path::PathBuf,
    posted: u16,
}

impl Rig {
    fn new() -> Rig {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");
        let mut q = Queue::new(256).expect("queue");
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        assert!(q.is_valid(&mem));
        let disk = std::env::temp_dir().join(format!(
            "mcvmm-blk-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&disk, vec![0x5au8; 64 * 1024]).expect("disk");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&disk)
            .expect("open");
        let dev = Block::new(file, disk.display().to_string(), false, "test").expect("block");
        Rig {
            mem,
            queues: vec![q],
            dev,
            irq: Arc::new(Interrupt::new(5, Arc::new(CountingLine::default()))),
            disk,
            posted: 0,
        }
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(DESC + 16 * u64::from(i));
        self.mem.write_obj(addr, at).expect("desc");
        self.mem
            .write_obj(len, GuestAddress(at.0 + 8))
            .expect("desc");
        self.mem
            .write_obj(flags, GuestAddress(at.0 + 12))
            .expect("desc");
        self.mem
            .write_obj(next, GuestAddress(at.0 + 14))
            .expect("desc");
    }

    fn header(&self, at: u64, rtype: u32, sector: u64) {
        self.mem.write_obj(rtype, GuestAddress(at)).expect("hdr");
        self.mem
            .write_obj(sector, GuestAddress(at + 8))
            .expect("hdr");
    }

    /// Posts the chain starting at `head` and lets the device process the queue.
    fn submit(&mut self, head: u16) -> u16 {
        self.mem
            .write_obj(
                head,
                GuestAddress(AVAIL + 4 + 2 * u64::from(self.posted % QSIZE)),
            )
            .expect("ring");
        self.posted += 1;
        self.mem
            .write_obj(self.posted, GuestAddress(AVAIL + 2))
            .expect("idx");
        self.dev
            .process_queue(0, &mut self.queues, &self.mem, &self.irq)
            .expect("device must not fail");
        self.mem
            .read_obj::<u16>(GuestAddress(USED + 2))
            .expect("used idx")
    }

    fn status(&self, at: u64) -> u8 {
        self.mem.read_obj(GuestAddress(at)).expect("status")
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.disk);
    }
}

#[test]
fn a_good_read_then_bad_requests_each_fail_alone() {
    let mut r = Rig::new();
    // A good read of sector 1 into guest memory at 0x8000.
    r.header(0x4000, 0, 1);
    r.desc(0, 0x4000, 16, NEXT, 1);
    r.desc(1, 0x8000, 512, WRITE | NEXT, 2);
    r.desc(2, 0x5000, 1, WRITE, 0);
    r.mem
        .write_obj(0xffu8, GuestAddress(0x5000))
        .expect("poison");
    assert_eq!(r.submit(0), 1);
    assert_eq!(r.status(0x5000), 0, "good read: OK");
    assert_eq!(
        r.mem.read_obj::<u8>(GuestAddress(0x8000)).expect("data"),
        0x5a
    );

    // Data buffer outside guest memory.
    r.desc(1, 0xffff_0000, 512, WRITE | NEXT, 2);
    assert_eq!(r.submit(0), 2);
    assert_eq!(r.status(0x5000), 1, "outside memory: IOERR");

    // A sector past the end of the disk.
    r.header(0x4000, 0, 1 << 40);
    r.desc(1, 0x8000, 512, WRITE | NEXT, 2);
    assert_eq!(r.submit(0), 3);
    assert_eq!(r.status(0x5000), 1, "past the end: IOERR");

    // A write whose data descriptor is device-writable (wrong direction).
    r.header(0x4000, 1, 0);
    assert_eq!(r.submit(0), 4);
    assert_eq!(r.status(0x5000), 1, "wrong direction: IOERR");

    // A chain that loops back on itself fails where it closes: IOERR in its tail.
    r.header(0x4000, 0, 0);
    r.desc(3, 0x4000, 16, NEXT, 4);
    r.desc(4, 0x8000, 512, WRITE | NEXT, 6);
    r.desc(6, 0x5000, 1, WRITE | NEXT, 3);
    r.mem
        .write_obj(0xffu8, GuestAddress(0x5000))
        .expect("poison");
    assert_eq!(r.submit(3), 5);
    assert_eq!(r.status(0x5000), 1, "looping chain: IOERR");
    assert_eq!(
        r.mem
            .read_obj::<u32>(GuestAddress(USED + 4 + 8 * 4 + 4))
            .expect("used len"),
        0,
        "looping chain: nothing transferred"
    );

    // A header that is too short.
    r.desc(5, 0x4000, 8, NEXT, 2);
    assert_eq!(r.submit(5), 6);
    assert_eq!(r.status(0x5000), 1, "short header: IOERR");

    // And the device still serves a good request afterwards.
    r.header(0x4000, 0, 2);
    r.desc(1, 0x8000, 512, WRITE | NEXT, 2);
    r.mem
        .write_obj(0xffu8, GuestAddress(0x5000))
        .expect("poison");
    assert_eq!(r.submit(0), 7);
    assert_eq!(r.status(0x5000), 0, "good read after bad ones: OK");
}

/// A sink that counts what it is handed; `on` says whether it records.
struct Counting {
    on: std::sync::atomic::AtomicBool,
    seen: std::sync::Mutex<Vec<(u64, usize)>>,
}

impl mcvmm_checkpoint::seams::DiskWriteSink for Counting {
    fn written(&self, _disk: usize, offset: u64, data: Vec<u8>) {
        self.seen.lock().expect("lock").push((offset, data.len()));
    }
    fn recording(&self) -> bool {
        self.on.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[test]
fn writes_reach_the_disk_whether_or_not_the_sink_records() {
    let mut r = Rig::new();
    let sink = Arc::new(Counting {
        on: std::sync::atomic::AtomicBool::new(false),
        seen: std::sync::Mutex::new(Vec::new()),
    });
    r.dev.forward_writes(0, sink.clone());
    let write_sector = |r: &mut Rig, sector: u64, byte: u8, expect_used: u16| {
        r.header(0x4000, 1, sector);
        r.desc(0, 0x4000, 16, NEXT, 1);
        r.desc(1, 0x8000, 512, NEXT, 2);
        r.desc(2, 0x5000, 1, WRITE, 0);
        r.mem
            .write_slice(&[byte; 512], GuestAddress(0x8000))
            .expect("data");
        r.mem
            .write_obj(0xffu8, GuestAddress(0x5000))
            .expect("poison");
        assert_eq!(r.submit(0), expect_used);
        assert_eq!(r.status(0x5000), 0, "write of sector {sector}: OK");
    };
    // Not recording (a guest not protected now): written directly, nothing handed over.
    write_sector(&mut r, 3, 0x11, 1);
    assert!(sink.seen.lock().expect("lock").is_empty());
    // Recording: written and handed over.
    sink.on.store(true, std::sync::atomic::Ordering::SeqCst);
    write_sector(&mut r, 4, 0x22, 2);
    assert_eq!(*sink.seen.lock().expect("lock"), vec![(4 * 512, 512)]);
    let disk = std::fs::read(&r.disk).expect("disk");
    assert!(disk[3 * 512..4 * 512].iter().all(|b| *b == 0x11));
    assert!(disk[4 * 512..5 * 512].iter().all(|b| *b == 0x22));
}

#[test]
fn scattered_segments_move_in_order_and_the_pages_read_into_are_marked() {
    use vm_memory::bitmap::Bitmap;
    use vm_memory::GuestMemoryBackend;

    let mut r = Rig::new();
    // A write of sector 8 from three buffers out of address order.
    r.header(0x4000, 1, 8);
    r.desc(0, 0x4000, 16, NEXT, 1);
    r.desc(1, 0x8000, 512, NEXT, 3);
    r.desc(3, 0xa000, 1024, NEXT, 4);
    r.desc(4, 0x9000, 512, NEXT, 2);
    r.desc(2, 0x5000, 1, WRITE, 0);
    for (at, byte, len) in [(0x8000, 1u8, 512), (0xa000, 2, 1024), (0x9000, 3, 512)] {
        r.mem
            .write_slice(&vec![byte; len], GuestAddress(at))
            .expect("data");
    }
    assert_eq!(r.submit(0), 1);
    assert_eq!(r.status(0x5000), 0, "scattered write: OK");
    let disk = std::fs::read(&r.disk).expect("disk");
    let mut want = vec![1u8; 512];
    want.extend(vec![2u8; 1024]);
    want.extend(vec![3u8; 512]);
    assert_eq!(
        &disk[8 * 512..12 * 512],
        &want[..],
        "segments in chain order"
    );
    assert!(
        disk[12 * 512..13 * 512].iter().all(|&b| b == 0x5a),
        "nothing past it"
    );

    // Read it back into three other buffers, also out of order.
    r.header(0x4000, 0, 8);
    r.desc(1, 0xc000, 1024, WRITE | NEXT, 3);
    r.desc(3, 0xe000, 512, WRITE | NEXT, 4);
    r.desc(4, 0xd000, 512, WRITE | NEXT, 2);
    // The same regions (and bitmaps) as the rig's.
    let mem = r.mem.clone();
    let region = mem.iter().next().expect("region");
    std::ops::Deref::deref(region).bitmap().reset();
    assert_eq!(r.submit(0), 2);
    assert_eq!(r.status(0x5000), 0, "scattered read: OK");
    let read = |at: u64, len: usize| {
        let mut b = vec![0u8; len];
        r.mem.read_slice(&mut b, GuestAddress(at)).expect("read");
        b
    };
    assert_eq!(read(0xc000, 1024), want[..1024]);
    assert_eq!(read(0xe000, 512), want[1024..1536]);
    assert_eq!(read(0xd000, 512), want[1536..]);
    let bitmap = std::ops::Deref::deref(region).bitmap();
    for page in [0xc000usize, 0xd000, 0xe000] {
        assert!(bitmap.dirty_at(page), "page {page:#x} read into is marked");
    }
    assert!(!bitmap.dirty_at(0xf000), "a page not read into is not");
}
