//! mcvmm-lab: boot test hosts (Linux under QEMU TCG with nested SVM, so they have a real
//! /dev/kvm), put files in, run commands there, bring back output and exit status.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use mcvmm_lab::reference::{self, GuestImages};
use mcvmm_lab::{assets, HostOptions, KvmHost, Lab, LabOptions, Stream};

#[derive(Parser)]
#[command(
    name = "mcvmm-lab",
    about = "Test hosts with real KVM for machines without it",
    long_about = "Boots test hosts: Linux VMs under QEMU's TCG emulating AMD SVM with nested \
paging, so each has a real kvm_amd and a /dev/kvm on which Linux guests boot. Files go in \
through the initramfs (or later over a virtio-serial control channel), commands run under \
/bin/sh in /work, and their output and exit status come back. Everything the lab creates \
(QEMU processes, the lab network namespace, run folders) is removed when it exits, \
including on Ctrl-C.\n\nThe test host kernel is one Debian cloud kernel, pinned \
(linux-image-6.1.0-48-cloud-amd64; MCVMM_LAB_HOST_KERNEL=RELEASE tries another), \
downloaded once into ~/.cache/mcvmm/lab (MCVMM_CACHE overrides)."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Download the test host kernel (once) and check the tools the lab needs.
    Setup,
    /// Boot test hosts, run a command in the first one, print its output; exits with the
    /// command's status.
    Run {
        /// Number of test hosts (all booted; the command runs in host 0).
        #[arg(long, default_value_t = 1)]
        hosts: usize,
        /// Join the hosts on a lab network (10.77.0.0/24; host i is 10.77.0.10+i, on br0).
        #[arg(long)]
        net: bool,
        /// Put QEMU (the reference VMM) in the hosts.
        #[arg(long)]
        qemu: bool,
        /// Put the test guest (guest-images/out) in the hosts, under guest/.
        #[arg(long)]
        guest: bool,
        /// Copy a local file in: LOCAL[:DEST]; DEST is relative to /work unless absolute.
        #[arg(long, value_name = "LOCAL[:DEST]")]
        copy: Vec<String>,
        /// Copy a binary in with the shared libraries it loads: LOCAL[:DEST].
        #[arg(long, value_name = "LOCAL[:DEST]")]
        bin: Vec<String>,
        /// Memory of each test host.
        #[arg(long, default_value_t = 2560)]
        mem_mib: u32,
        /// vCPUs of each test host.
        #[arg(long, default_value_t = 2)]
        cpus: u32,
        /// Run each test host's vCPUs on one TCG thread (slower, steadier with SMP guests).
        #[arg(long)]
        single_thread_tcg: bool,
        /// The test hosts' emulator: 7.2 (Debian 12's QEMU) or 10.0 (bookworm-backports);
        /// default MCVMM_LAB_EMULATOR, else the lab's choice.
        #[arg(long)]
        emulator: Option<mcvmm_lab::Emulator>,
        /// Run on this machine instead when its /dev/kvm is hardware KVM (files go to a
        /// work folder; only host 0).
        #[arg(long)]
        kvm_host: bool,
        /// The command is killed after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// The command, run with /bin/sh -c in /work.
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
    /// The reference proof: QEMU microvm boots the test guest in a test host, a client on
    /// the lab network makes acknowledged writes, the disk file is checked after the guest
    /// ends.
    Proof {
        #[arg(long, default_value_t = 200)]
        records: u64,
    },
    /// Remove what crashed lab runs left behind (run folders, network namespaces).
    Clean,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mcvmm-lab: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn split_copy(spec: &str) -> anyhow::Result<(PathBuf, String)> {
    let (local, dest) = match spec.split_once(':') {
        Some((l, d)) => (PathBuf::from(l), d.to_string()),
        None => {
            let p = PathBuf::from(spec);
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .with_context(|| format!("{spec}: not a file name"))?;
            (p, name)
        }
    };
    if !local.is_file() {
        bail!("{}: no such file to copy", local.display());
    }
    Ok((local, dest))
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Cmd::Setup => {
            let kernel = mcvmm_lab::host_kernel()?;
            println!(
                "test host kernel: {} ({})",
                kernel.release,
                kernel.vmlinuz.display()
            );
            for tool in ["qemu-system-x86_64", "ip", "ldd", "dash"] {
                if !assets::in_path(tool) {
                    bail!(
                        "{tool} not found in PATH (scripts/setup.sh installs what the lab needs)"
                    );
                }
            }
            println!(
                "labd: {}",
                assets::workspace_binary("mcvmm-labd")?.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Clean => {
            mcvmm_lab::cleanup::remove_stale();
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Proof { records } => {
            let report = reference::proof(records, &mut |m| println!("proof: {m}"))?;
            println!(
                "proof: OK — test host boot {:.1} s, guest ready {} ms, {} records at {:.0}/s, guest exit {:.2} s after shutdown",
                report.host_boot.as_secs_f64(),
                report.guest_ready_ms,
                report.records,
                report.records_per_sec,
                report.end_to_exit.as_secs_f64()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run {
            hosts,
            net,
            qemu,
            guest,
            copy,
            bin,
            mem_mib,
            cpus,
            timeout,
            command,
            kvm_host,
            single_thread_tcg,
            emulator,
        } => {
            let mut opts = HostOptions {
                mem_mib,
                cpus,
                single_thread_tcg,
                emulator,
                with_qemu: qemu,
                ..HostOptions::default()
            };
            for c in &copy {
                opts.files.push(split_copy(c)?);
            }
            for b in &bin {
                opts.binaries.push(split_copy(b)?);
            }
            if guest {
                opts.files.extend(GuestImages::locate()?.files());
            }
            let mut print = |stream: Stream, data: &[u8]| {
                let _ = match stream {
                    Stream::Stdout => std::io::stdout().write_all(data),
                    Stream::Stderr => std::io::stderr().write_all(data),
                };
            };
            let command = command.join(" ");
            let out = if kvm_host && hosts == 1 && !net {
                let host = KvmHost::acquire(&opts)?;
                if let KvmHost::Local { .. } = host {
                    for (local, dest) in opts.files.iter().chain(&opts.binaries) {
                        host.put_file(local, dest)?;
                    }
                }
                eprintln!("mcvmm-lab: running on {}", host.describe());
                host.run_streaming(&command, Duration::from_secs(timeout), &mut print)?
            } else {
                let lab = Lab::start(&LabOptions {
                    hosts,
                    network: net,
                    host: opts,
                })?;
                eprintln!(
                    "mcvmm-lab: {hosts} test host(s) up in {:.1} s ({})",
                    lab.boot_time.as_secs_f64(),
                    lab.host(0).emulator
                );
                lab.host(0)
                    .run_streaming(&command, Duration::from_secs(timeout), &mut print)?
            };
            if out.timed_out {
                eprintln!("mcvmm-lab: command killed after the {timeout} s limit");
            }
            Ok(ExitCode::from(out.status.clamp(0, 255) as u8))
        }
    }
}
