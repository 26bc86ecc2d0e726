//! mcvmm: a small KVM VMM built for fault tolerance by micro-checkpointing.

mod api;
mod boot;
mod event_loop;
mod layout;
mod vcpu;
mod vm;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

use crate::vcpu::ExitReason;
use crate::vm::{DiskConfig, SerialOut, VmConfig};

#[derive(Parser)]
#[command(
    name = "mcvmm",
    version,
    about = "A small KVM VMM built for fault tolerance by micro-checkpointing"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest (standalone).
    Run(RunArgs),
    /// Talk to a running mcvmm through its control socket.
    Ctl {
        #[arg(long, value_name = "PATH")]
        api_sock: PathBuf,
        /// status | stop
        request: String,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Kernel: an ELF vmlinux (PVH entry used when present) or a bzImage.
    #[arg(long, value_name = "FILE")]
    kernel: PathBuf,
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    /// Kernel command line (the user part; mcvmm adds the console, i8042 and virtio-mmio
    /// device entries).
    #[arg(long, default_value = "")]
    cmdline: String,
    /// A raw disk image, as virtio-blk (vda, vdb, ... in order); `,ro` makes it read-only.
    #[arg(long, value_name = "FILE[,ro]")]
    disk: Vec<String>,
    /// A tap device for virtio-net: an existing one, or created (and set up) if none.
    #[arg(long, value_name = "NAME")]
    tap: Option<String>,
    /// The guest's MAC address.
    #[arg(long, value_name = "MAC", default_value = "52:54:00:12:34:56")]
    mac: String,
    /// Guest memory in MiB (above 3072, RAM continues past the 4 GiB line).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(16..=262_144))]
    mem_mib: u64,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=32))]
    vcpus: u8,
    /// Where the guest console goes: `stdio` or a file.
    #[arg(long, default_value = "stdio")]
    serial: String,
    /// Control socket (see `mcvmm ctl`).
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
}

fn parse_mac(s: &str) -> anyhow::Result<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        bail!("--mac {s}: expected six hex bytes like 52:54:00:12:34:56");
    }
    for (m, p) in mac.iter_mut().zip(&parts) {
        *m = u8::from_str_radix(p, 16)
            .with_context(|| format!("--mac {s}: {p:?} is not a hex byte"))?;
    }
    if mac[0] & 1 != 0 {
        bail!("--mac {s}: a multicast address cannot be a NIC's");
    }
    Ok(mac)
}

fn config(args: RunArgs) -> anyhow::Result<(VmConfig, Option<PathBuf>)> {
    let disks = args
        .disk
        .iter()
        .map(|d| match d.strip_suffix(",ro") {
            Some(p) => DiskConfig {
                path: p.into(),
                read_only: true,
            },
            None => DiskConfig {
                path: d.into(),
                read_only: false,
            },
        })
        .collect();
    let serial = match args.serial.as_str() {
        "stdio" => SerialOut::Stdout,
        path => SerialOut::File(path.into()),
    };
    Ok((
        VmConfig {
            kernel: args.kernel,
            initrd: args.initrd,
            cmdline: args.cmdline,
            disks,
            tap: args.tap,
            mac: parse_mac(&args.mac)?,
            mem_mib: args.mem_mib,
            vcpus: args.vcpus,
            serial,
        },
        args.api_sock,
    ))
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let (cfg, api_sock) = config(args)?;
    // Blocked before any thread exists, so only the device loop ever sees them.
    let signals = event_loop::SignalFd::block_and_open().context("setting up signal handling")?;
    let api = match &api_sock {
        Some(p) => {
            let _ = std::fs::remove_file(p);
            Some(
                std::os::unix::net::UnixListener::bind(p)
                    .with_context(|| format!("control socket {}", p.display()))?,
            )
        }
        None => None,
    };
    let vm = vm::build(cfg)?;
    let reason = event_loop::run(&vm, &signals, api.as_ref()).context("device loop")?;
    if let Some(p) = &api_sock {
        let _ = std::fs::remove_file(p);
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    match reason {
        ExitReason::GuestEnded(how) => {
            eprintln!("mcvmm: guest ended ({how})");
            Ok(())
        }
        ExitReason::Stopped => {
            eprintln!("mcvmm: stopped");
            Ok(())
        }
        ExitReason::TripleFault { vcpu } => {
            bail!("guest triple fault on vCPU {vcpu} (the guest crashed)")
        }
        ExitReason::Failed { vcpu, why } => bail!("vCPU {vcpu}: {why}"),
    }
}

/// The error and its causes on one line, skipping a cause its parent already quoted.
fn one_line(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !msg.contains(&text) {
            if !msg.is_empty() {
                msg += ": ";
            }
            msg += &text;
        }
    }
    msg
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Ctl { api_sock, request } => api::request(&api_sock, &request)
            .map(|v| println!("{v:#}"))
            .map_err(Into::into),
    };
    match result {
        // vCPU threads may still be inside KVM_RUN; ending the process ends them.
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("mcvmm: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}
