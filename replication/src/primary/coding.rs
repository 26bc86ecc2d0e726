//! How a run of pages goes on the wire: a delta against the version the secondary holds,
//! LZ4, or raw, whichever is smallest.

use std::io::Write;

use mcvmm_checkpoint::PAGE_SIZE;

use crate::delta::SentPages;
use crate::messages::{self, PageEncoding};
use crate::wire::{self, Kind};

/// How pages go on the wire.
#[derive(Debug, Clone, Copy)]
pub struct PageCoding {
    /// LZ4 where it saves an eighth or more.
    pub lz4: bool,
    /// Pages sent before are kept (up to this many MiB) so a checkpoint can send a page
    /// as its difference from the version the secondary holds ([`delta`]); 0 for none.
    /// Only with `lz4`.
    pub delta_cache_mib: u64,
}

/// The sender's page encoder and its buffers.
pub(super) struct Coder {
    pub(super) coding: PageCoding,
    /// Made at the initial sync, when the guest's size is known.
    pub(super) sent: Option<SentPages>,
    pub(super) out: Vec<u8>,
    pub(super) xor: Vec<u8>,
}

impl Coder {
    pub(super) fn new(coding: PageCoding) -> Coder {
        Coder {
            coding,
            sent: None,
            out: Vec::new(),
            xor: Vec::new(),
        }
    }

    /// Whether a checkpoint's page at `gpa` is the version last sent. The primary copies
    /// pages it was not told are unchanged (those kept writable by the dirty log, written
    /// or not), and the secondary's image holds exactly what was sent: such a page needs
    /// no bytes at all, as a delta would be all zeros.
    pub(super) fn unchanged(&self, gpa: u64, page: &[u8]) -> bool {
        self.sent.as_ref().is_some_and(|s| s.unchanged(gpa, page))
    }

    /// Sizes the delta cache for a guest of `ram` bytes: never more than the guest.
    pub(super) fn fit(&mut self, ram: u64) {
        let c = self.coding;
        let mib = c.delta_cache_mib.min(ram.div_ceil(1 << 20));
        self.sent = (c.lz4 && mib > 0).then(|| SentPages::new(mib));
    }
}

/// Writes a run of pages: as a delta against what the secondary holds if that pays and
/// this is a checkpoint (epoch > 0), else LZ4 if that pays, else raw.
pub(super) fn page_run(
    w: &mut impl Write,
    epoch: u64,
    gpa: u64,
    data: &[u8],
    c: &mut Coder,
) -> std::io::Result<usize> {
    let count = (data.len() as u64 / PAGE_SIZE) as u32;
    let mut encoding = PageEncoding::Raw;
    if let Some(sent) = c.sent.as_mut() {
        if epoch > 0 && sent.encode(gpa, data, &mut c.xor, &mut c.out) {
            encoding = PageEncoding::Delta;
        }
        sent.put(gpa, data);
    }
    if encoding == PageEncoding::Raw && c.coding.lz4 {
        c.out
            .resize(lz4_flex::block::get_maximum_output_size(data.len()), 0);
        if let Ok(n) = lz4_flex::block::compress_into(data, &mut c.out) {
            if n < data.len() - data.len() / 8 {
                c.out.truncate(n);
                encoding = PageEncoding::Lz4;
            }
        }
    }
    let h = messages::pages_header(gpa, count, encoding);
    let body = if encoding == PageEncoding::Raw {
        data
    } else {
        &c.out
    };
    wire::write_frame(w, Kind::Pages, epoch, &[&h, body])
}
