//! A vCPU's complete state out of KVM and back in (see `mcvmm_checkpoint::state`).

use kvm_bindings::{kvm_cpuid_entry2, kvm_msr_entry, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::VcpuFd;
use mcvmm_checkpoint::state::{Msr, VcpuState};

/// KVM reads MSRs in batches of at most this many.
const MSR_BATCH: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    #[error("{what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("MSR list: {0}")]
    MsrList(String),
    #[error("KVM_SET_MSRS: MSR {0:#x} refused")]
    MsrRefused(u32),
}

fn err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Kvm { what, source }
}

/// Reads every MSR of `indices` that KVM can read for this vCPU. KVM stops a batch at the
/// first MSR it cannot read; that one is skipped (it is not part of the vCPU's state on
/// this host) and the rest of the batch is read again.
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<Msr>, VcpuStateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(MSR_BATCH)];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|e| VcpuStateError::MsrList(format!("{e:?}")))?;
        let n = vcpu.get_msrs(&mut msrs).map_err(err("KVM_GET_MSRS"))?;
        out.extend(msrs.as_slice()[..n].iter().map(|e| Msr {
            index: e.index,
            data: e.data,
        }));
        // Skip the one that failed, if the batch stopped early.
        rest = &rest[(n + usize::from(n < batch.len())).min(rest.len())..];
    }
    Ok(out)
}

/// What a vCPU's captures learn at the first one and never read again: its CPUID (set
/// before it first ran, fixed since), its TSC frequency, and which of the host's MSRs it
/// can read. A replicating primary captures every epoch, and each ioctl less is time the
/// guest runs.
#[derive(Default)]
pub struct Learned {
    cpuid: Option<Vec<kvm_cpuid_entry2>>,
    tsc_khz: Option<Option<u32>>,
    readable_msrs: Option<Vec<u32>>,
}

/// Captures vCPU `id` (which must be out of KVM_RUN, its last exit completed).
pub fn save(
    vcpu: &VcpuFd,
    id: u8,
    msr_indices: &[u32],
    learned: &mut Learned,
) -> Result<VcpuState, VcpuStateError> {
    let cpuid = match &learned.cpuid {
        Some(c) => c.clone(),
        None => {
            let c = vcpu
                .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
                .map_err(err("KVM_GET_CPUID2"))?
                .as_slice()
                .to_vec();
            learned.cpuid.insert(c).clone()
        }
    };
    let tsc_khz = *learned
        .tsc_khz
        .get_or_insert_with(|| vcpu.get_tsc_khz().ok());
    let msrs = match &learned.readable_msrs {
        Some(readable) => read_msrs(vcpu, readable)?,
        None => {
            let msrs = read_msrs(vcpu, msr_indices)?;
            learned.readable_msrs = Some(msrs.iter().map(|m| m.index).collect());
            msrs
        }
    };
    Ok(VcpuState {
        id,
        cpuid,
        tsc_khz,
        mp_state: vcpu.get_mp_state().map_err(err("KVM_GET_MP_STATE"))?,
        regs: vcpu.get_regs().map_err(err("KVM_GET_REGS"))?,
        sregs: vcpu.get_sregs().map_err(err("KVM_GET_SREGS"))?,
        xsave: vcpu.get_xsave().map_err(err("KVM_GET_XSAVE"))?,
        xcrs: vcpu.get_xcrs().map_err(err("KVM_GET_XCRS"))?,
        debugregs: vcpu.get_debug_regs().map_err(err("KVM_GET_DEBUGREGS"))?,
        lapic: vcpu.get_lapic().map_err(err("KVM_GET_LAPIC"))?,
        msrs,
        events: vcpu.get_vcpu_events().map_err(err("KVM_GET_VCPU_EVENTS"))?,
    })
}

/// Puts a saved state into a fresh vCPU (its CPUID already set from the same state).
/// The order follows KVM's dependencies: sregs (paging, EFER) before the registers and
/// MSRs that rely on them, the LAPIC before the events that may inject into it.
pub fn restore(vcpu: &VcpuFd, s: &VcpuState) -> Result<(), VcpuStateError> {
    if let Some(khz) = s.tsc_khz {
        // The same TSC rate as where the state came from; hosts that cannot scale keep
        // theirs (the guest's clocksource then recalibrates through kvmclock).
        if vcpu.get_tsc_khz().ok() != Some(khz) {
            let _ = vcpu.set_tsc_khz(khz);
        }
    }
    vcpu.set_mp_state(s.mp_state)
        .map_err(err("KVM_SET_MP_STATE"))?;
    vcpu.set_sregs(&s.sregs).map_err(err("KVM_SET_SREGS"))?;
    vcpu.set_regs(&s.regs).map_err(err("KVM_SET_REGS"))?;
    // SAFETY: mcvmm never enables dynamic XSAVE features (arch_prctl), so KVM's XSAVE
    // area fits the 4 KiB kvm_xsave and KVM reads nothing beyond it.
    unsafe { vcpu.set_xsave(&s.xsave) }.map_err(err("KVM_SET_XSAVE"))?;
    // A host without XSAVE reports no XCRs and refuses to set any.
    if s.xcrs.nr_xcrs > 0 {
        vcpu.set_xcrs(&s.xcrs).map_err(err("KVM_SET_XCRS"))?;
    }
    vcpu.set_debug_regs(&s.debugregs)
        .map_err(err("KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&s.lapic).map_err(err("KVM_SET_LAPIC"))?;
    let entries: Vec<kvm_msr_entry> = s
        .msrs
        .iter()
        .map(|m| kvm_msr_entry {
            index: m.index,
            data: m.data,
            ..Default::default()
        })
        .collect();
    for chunk in entries.chunks(MSR_BATCH) {
        let msrs =
            Msrs::from_entries(chunk).map_err(|e| VcpuStateError::MsrList(format!("{e:?}")))?;
        let n = vcpu.set_msrs(&msrs).map_err(err("KVM_SET_MSRS"))?;
        if n != chunk.len() {
            return Err(VcpuStateError::MsrRefused(chunk[n].index));
        }
    }
    vcpu.set_vcpu_events(&s.events)
        .map_err(err("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

/// The highest vector set in one of the LAPIC's 256-bit registers (ISR at 0x100, IRR at
/// 0x200: eight 32-bit words, 16 bytes apart).
fn lapic_top_vector(regs: &[std::os::raw::c_char; 1024], base: usize) -> Option<u32> {
    (0..8).rev().find_map(|w| {
        let at = base + w * 16;
        let word = u32::from_le_bytes([
            regs[at] as u8,
            regs[at + 1] as u8,
            regs[at + 2] as u8,
            regs[at + 3] as u8,
        ]);
        (word != 0).then(|| w as u32 * 32 + 31 - word.leading_zeros())
    })
}

/// What an operator looks at to see where a guest that stopped answering is stuck: where
/// each vCPU executes, whether it takes interrupts, and what its LAPIC holds pending.
pub fn summary(s: &VcpuState) -> serde_json::Value {
    const RFLAGS_IF: u64 = 1 << 9;
    serde_json::json!({
        "id": s.id,
        "mp_state": match s.mp_state.mp_state {
            0 => "runnable".to_string(),
            1 => "uninitialized".to_string(),
            2 => "init-received".to_string(),
            3 => "halted".to_string(),
            n => format!("state {n}"),
        },
        "rip": format!("{:#x}", s.regs.rip),
        "rsp": format!("{:#x}", s.regs.rsp),
        "interrupts_enabled": s.regs.rflags & RFLAGS_IF != 0,
        "cr3": format!("{:#x}", s.sregs.cr3),
        "interrupt_shadow": s.events.interrupt.shadow,
        "injected_interrupt": (s.events.interrupt.injected != 0).then_some(s.events.interrupt.nr),
        "pending_exception": (s.events.exception.injected != 0 || s.events.exception.pending != 0)
            .then_some(s.events.exception.nr),
        "nmi_pending": s.events.nmi.pending != 0,
        "lapic_tpr": s.lapic.regs[0x80] as u8,
        "lapic_isr_top": lapic_top_vector(&s.lapic.regs, 0x100),
        "lapic_irr_top": lapic_top_vector(&s.lapic.regs, 0x200),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_top_vector_is_the_highest_bit_of_the_eight_words() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        assert_eq!(lapic_top_vector(&regs, 0x200), None);
        // Vector 0x31 (word 1, bit 17) and vector 0xec (word 7, bit 12).
        regs[0x200 + 16 + 2] = 0x02;
        assert_eq!(lapic_top_vector(&regs, 0x200), Some(0x31));
        regs[0x200 + 7 * 16 + 1] = 0x10;
        assert_eq!(lapic_top_vector(&regs, 0x200), Some(0xec));
        assert_eq!(lapic_top_vector(&regs, 0x100), None, "ISR is apart");
    }
}
