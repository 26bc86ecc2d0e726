//! The 16550 UART at 0x3f8 (IRQ 4): the guest's console, output to stdout or a file.

use std::io::Write;
use std::sync::Arc;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial as Uart, Trigger};

use crate::bus::BusDevice;
use crate::interrupt::Interrupt;

pub const PORT: u64 = 0x3f8;
pub const PORT_LEN: u64 = 8;
pub const IRQ: u32 = 4;

pub struct IrqTrigger(pub Arc<Interrupt>);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.irqfd.write(1)
    }
}

pub struct Serial {
    uart: Uart<IrqTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl Serial {
    pub fn new(interrupt: Arc<Interrupt>, out: Box<dyn Write + Send>) -> Serial {
        Serial {
            uart: Uart::new(IrqTrigger(interrupt), out),
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&b), Ok(off)) = (data.first(), u8::try_from(offset)) {
            // An output error (a closed console) must not stop the guest.
            let _ = self.uart.write(off, b);
        }
    }
}
