//! mcvmm: a small KVM VMM built for fault tolerance by micro-checkpointing.

mod api;
mod boot;
mod coalesced;
mod control;
mod cycle;
mod epochs;
mod event_loop;
mod fencing;
mod irq_line;
mod keeper;
mod layout;
mod log;
mod phase;
mod primary;
mod protect;
mod secondary;
mod snapshot;
mod subscriber;
mod vcpu;
mod vcpu_state;
mod vm;
mod vm_state;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

use crate::control::ControlServer;
use crate::event_loop::Role;
use crate::vcpu::ExitReason;
use crate::vm::{DiskConfig, SerialOut, Source, VmConfig};
use mcvmm_checkpoint::snapshot::{self as snapshot_files, Loaded};
use mcvmm_checkpoint::state::{DiskShape, VmShape};
use mcvmm_replication::primary as replication;

#[derive(Parser)]
#[command(
    name = "mcvmm",
    version,
    about = "A small KVM VMM built for fault tolerance by micro-checkpointing"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Which log lines to show: a level (error, warn, info, debug, trace) or a tracing
    /// filter such as `info,mcvmm_replication=debug` [default: MCVMM_LOG, else info].
    #[arg(long, global = true, value_name = "FILTER")]
    log_level: Option<String>,
    /// How log lines look: text (`mcvmm: [level: ]message`) or json (one object a line).
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: log::LogFormat,
}

#[derive(Subcommand)]
enum Command {
    /// Run a guest: standalone, as a replicating primary (--primary), or as the secondary
    /// that receives its checkpoints and takes over when the primary is lost (--secondary).
    Run(Box<RunArgs>),
    /// Talk to a running mcvmm through its control socket. Prints the JSON reply; exits 1
    /// when the request failed or was not understood (the reply's "error" says why).
    ///
    /// Requests of every guest-running VMM (standalone, primary, taken over):
    /// status | stop | vcpus (each vCPU's rip, interrupt flag, halted or not, LAPIC
    /// pending vectors).
    /// Standalone or unprotected: pause | resume | snapshot DIR [incremental] |
    /// selfcheck EPOCHS INTERVAL_MS [guest-only] | epochs EPOCHS INTERVAL_MS |
    /// protect HOST:PORT [GENERATION] (replicate the guest to a new secondary from now
    /// on; the generation defaults to this node's).
    /// Primary: verify (digests checked with the next checkpoint) | failover (planned
    /// switch to the secondary) | selfcheck EPOCHS INTERVAL_MS (the self-check on the
    /// primary's next EPOCHS checkpoints, at its own epoch length).
    /// Secondary: status | stop | failover (take over now: only when you know the
    /// primary is dead).
    #[command(verbatim_doc_comment)]
    Ctl {
        #[arg(long, value_name = "PATH")]
        api_sock: PathBuf,
        /// The request and its arguments (see above).
        #[arg(required = true, num_args = 1..)]
        request: Vec<String>,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Kernel: an ELF vmlinux (PVH entry used when present) or a bzImage.
    #[arg(long, value_name = "FILE", required_unless_present_any = ["restore", "secondary"])]
    kernel: Option<PathBuf>,
    #[arg(long, value_name = "FILE", conflicts_with = "restore")]
    initrd: Option<PathBuf>,
    /// Continue the guest of a snapshot (`mcvmm ctl snapshot`; an incremental one brings
    /// its parents) instead of booting a kernel. Disks and tap are given again, in the
    /// same order and sizes; memory and vCPUs come from the snapshot.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "cmdline"])]
    restore: Option<PathBuf>,
    /// Kernel command line (the user part; mcvmm adds the console, i8042 and virtio-mmio
    /// device entries).
    #[arg(long)]
    cmdline: Option<String>,
    /// A raw disk image, as virtio-blk (vda, vdb, ... in order); `,ro` makes it read-only.
    #[arg(long, value_name = "FILE[,ro]")]
    disk: Vec<String>,
    /// A tap device for virtio-net: an existing one, or created (and set up) if none.
    #[arg(long, value_name = "NAME")]
    tap: Option<String>,
    /// The guest's MAC address.
    #[arg(long, value_name = "MAC", default_value = "52:54:00:12:34:56")]
    mac: String,
    /// Guest memory in MiB (above 3072, RAM continues past the 4 GiB line) [default: 256,
    /// or the snapshot's].
    #[arg(long, value_parser = clap::value_parser!(u64).range(16..=262_144))]
    mem_mib: Option<u64>,
    /// vCPUs [default: 1, or the snapshot's].
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=32))]
    vcpus: Option<u8>,
    /// Where the guest console goes: `stdio` or a file.
    #[arg(long, default_value = "stdio")]
    serial: String,
    /// Control socket (see `mcvmm ctl`).
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Protect the guest: replicate it to the secondary at --peer, checkpoint every
    /// --epoch-ms; the guest's network output leaves only once its checkpoint is
    /// committed there.
    #[arg(long, requires = "peer", conflicts_with_all = ["secondary", "restore"])]
    primary: bool,
    /// The secondary's address (HOST:PORT). The primary waits up to --peer-wait-s for it.
    #[arg(long, value_name = "HOST:PORT")]
    peer: Option<String>,
    /// Epoch length: how often the primary checkpoints. Shorter epochs add less latency to
    /// the guest's network output, longer ones cost less guest time.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(5..=10_000))]
    epoch_ms: u64,
    /// Let an epoch in which the guest sent network output end once it is this old (and
    /// every earlier checkpoint is acknowledged) instead of at --epoch-ms. Off by default
    /// (= --epoch-ms): in the lab it added latency, an answer's frames being split over
    /// two checkpoints. Each epoch costs the guest one pause.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    epoch_min_ms: Option<u64>,
    /// How long the primary waits for the secondary to be reachable at start.
    #[arg(long, default_value_t = 60)]
    peer_wait_s: u64,
    /// Page compression on the wire: lz4 (pages that shrink by an eighth or more are sent
    /// compressed) or none.
    #[arg(long, default_value = "lz4", value_parser = ["lz4", "none"])]
    compress: String,
    /// With lz4: MiB of pages the primary keeps as it sent them, so that a page sent
    /// before goes as LZ4 of its XOR with that version (a page changed in a few bytes
    /// costs a few dozen); 0 turns this off.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(0..=65_536))]
    delta_cache_mib: u64,
    /// At most this many pages written in two epochs running are left writable instead
    /// of write-protected again (each protection costs the guest a fault on its next
    /// write, every epoch): they are copied at every pause, written or not, and sent only
    /// if they changed (with the delta cache); all are protected again every 8 epochs.
    /// 0 turns this off.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(0..=1 << 22))]
    hot_pages: u64,
    /// Receive a primary's checkpoints on --listen and take over when it is lost. Needs
    /// no kernel: memory, vCPUs and the MAC come from the primary; give the disks (same
    /// order and sizes as the primary's), and --tap if the guest has a NIC.
    #[arg(long, requires = "listen", conflicts_with_all = ["kernel", "restore"])]
    secondary: bool,
    /// Where the secondary listens (ADDR:PORT).
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<String>,
    /// The peer counts as lost after this long without a frame (the secondary takes over;
    /// the primary goes on unprotected). A closed connection counts at once.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(50..=600_000))]
    failover_timeout_ms: u64,
    /// Generation of this primary; a secondary that took over refuses primaries whose
    /// generation is not above its own. With --etcd this node must win it in the fence
    /// (the owner key at generation-1, or this node's at generation) before the guest runs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    generation: u64,
    /// Fence the guest with etcd (URL[,URL...]): a takeover, and a primary's release of
    /// output held for a secondary it lost, happen only on the node that won the next
    /// generation of the key /mcvmm/VM_NAME/owner; the loser stops its guest and exits
    /// non-zero. This protects against partitions, frozen processes and hosts, and
    /// `ctl failover` on a live primary. While etcd does not answer, nothing held is
    /// released and nothing is taken over. Without --etcd, a secondary takes over only
    /// when its primary's connection closes while frames were still arriving (the
    /// process died) or when told to (`ctl failover`): silence alone never starts a
    /// guest, so a host that loses power needs an operator.
    #[arg(
        long,
        value_name = "URL[,URL...]",
        value_delimiter = ',',
        requires = "vm_name"
    )]
    etcd: Vec<String>,
    /// The guest's name in the fence (letters, digits, '-', '_', '.').
    #[arg(long, value_name = "NAME", requires = "etcd")]
    vm_name: Option<String>,
    /// This node's name in the fence [default: the host name].
    #[arg(long, value_name = "NAME", requires = "etcd")]
    node: Option<String>,
    /// A fenced primary that has lost its secondary and cannot win the fence within this
    /// long pauses its guest until it wins (it cannot know whether it still owns it).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=600_000))]
    fence_timeout_ms: u64,
}

/// How long one etcd call may take before it counts as unanswered.
const ETCD_CALL_TIMEOUT: Duration = Duration::from_secs(2);

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// The fence of `--etcd`, connected (etcd answered), if asked for.
fn connect_fence(args: &RunArgs) -> anyhow::Result<Option<mcvmm_fence::Fence>> {
    let Some(name) = &args.vm_name else {
        return Ok(None);
    };
    let node = args.node.clone().unwrap_or_else(host_name);
    let fence = mcvmm_fence::Fence::connect(&args.etcd, name, &node, ETCD_CALL_TIMEOUT)?;
    tracing::info!(
        "fence: {} as node {node:?}, owner now {}",
        fence.key(),
        fence
            .owner()?
            .map_or("nobody".to_string(), |o| o.to_string())
    );
    Ok(Some(fence))
}

/// Wins `generation` for a guest about to start here, or says who holds it.
fn claim_at_start(fence: mcvmm_fence::Fence, generation: u64) -> anyhow::Result<fencing::Fencing> {
    match fence.claim(generation)? {
        mcvmm_fence::Claim::Won(owner) => {
            tracing::info!("fence: the guest is this node's: {owner}");
            Ok(fencing::Fencing::start(fence, Some(owner))?)
        }
        mcvmm_fence::Claim::Lost { owner: Some(o) } => bail!(
            "fenced: {o} owns this guest, so generation {generation} cannot start here; start with --generation {} only once that node no longer runs it",
            o.generation + 1
        ),
        mcvmm_fence::Claim::Lost { owner: None } => bail!(
            "fenced: generation {generation} cannot start here: the key has no owner, so the first generation is 1"
        ),
    }
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

fn config(
    args: &RunArgs,
    snapshot: Option<&Loaded>,
) -> anyhow::Result<(VmConfig, Option<PathBuf>)> {
    let source = match (&args.restore, &args.kernel) {
        (Some(dir), _) => Source::Restore(dir.clone()),
        (None, Some(kernel)) => Source::Boot {
            kernel: kernel.clone(),
            initrd: args.initrd.clone(),
            cmdline: args.cmdline.clone().unwrap_or_default(),
        },
        (None, None) => bail!("--kernel or --restore is needed"),
    };
    let shape = snapshot.map(|l| l.shape());
    Ok((
        VmConfig {
            source,
            disks: disk_configs(&args.disk),
            tap: args.tap.clone(),
            mac: parse_mac(&args.mac)?,
            mem_mib: args.mem_mib.or(shape.map(|s| s.mem_mib)).unwrap_or(256),
            vcpus: args.vcpus.or(shape.map(|s| s.vcpus)).unwrap_or(1),
            serial: serial_out(&args.serial),
        },
        args.api_sock.clone(),
    ))
}

fn disk_configs(disks: &[String]) -> Vec<DiskConfig> {
    disks
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
        .collect()
}

fn serial_out(s: &str) -> SerialOut {
    match s {
        "stdio" => SerialOut::Stdout,
        path => SerialOut::File(path.into()),
    }
}

/// The shape the VM will have, known before it is built (for the handshake).
fn shape_of(cfg: &VmConfig) -> anyhow::Result<VmShape> {
    let disks = cfg
        .disks
        .iter()
        .map(|d| {
            let len = std::fs::metadata(&d.path)
                .with_context(|| format!("disk {}", d.path.display()))?
                .len();
            Ok(DiskShape {
                size_bytes: len / 512 * 512,
                read_only: d.read_only,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(VmShape {
        mem_mib: cfg.mem_mib,
        vcpus: cfg.vcpus,
        disks,
        net: cfg.tap.as_ref().map(|_| cfg.mac),
    })
}

fn bind_control(path: Option<&PathBuf>) -> anyhow::Result<Option<ControlServer>> {
    Ok(path.map(|p| ControlServer::bind(p)).transpose()?)
}

/// Connects to the secondary and agrees on the VM, before the VM is built: the first
/// half of becoming a primary, as `ctl protect` does it.
fn connect_primary(
    args: &RunArgs,
    cfg: &VmConfig,
    hooks: &protect::Hooks,
    settings: &protect::Settings,
) -> anyhow::Result<protect::Connection> {
    let peer = args.peer.clone().context("--primary needs --peer")?;
    let hello = protect::hello(shape_of(cfg)?, args.generation);
    tracing::info!("primary: connecting to the secondary at {peer}");
    let connection = protect::open(&peer, &hello, hooks.fresh_gate(), settings)?;
    tracing::info!(
        "secondary {peer} accepted the VM (generation {})",
        args.generation
    );
    Ok(connection)
}

/// How this node replicates when it protects a guest (at start or later).
fn settings(args: &RunArgs) -> protect::Settings {
    protect::Settings {
        epoch_ms: args.epoch_ms,
        // Not below --epoch-ms, it changes nothing: off.
        epoch_min_ms: args.epoch_min_ms.filter(|ms| *ms < args.epoch_ms),
        timeout: Duration::from_millis(args.failover_timeout_ms),
        coding: replication::PageCoding {
            lz4: args.compress == "lz4",
            delta_cache_mib: args.delta_cache_mib,
        },
        hot_pages: args.hot_pages,
        peer_wait: Duration::from_secs(args.peer_wait_s),
        fenced: !args.etcd.is_empty(),
        fence_timeout: Duration::from_millis(args.fence_timeout_ms),
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    // Without it a peer learns of this process's death only after the kernel has freed
    // the guest's memory. Not having one costs failover time, not correctness.
    if let Err(e) = keeper::start() {
        tracing::warn!("{e}; if this process is killed, its peer will notice only once the guest's memory is freed");
    }
    if args.secondary {
        return run_secondary(args);
    }
    // Everything about a snapshot is checked before anything is built.
    let snapshot = match &args.restore {
        Some(dir) => Some(
            snapshot_files::load(dir).with_context(|| format!("restore from {}", dir.display()))?,
        ),
        None => None,
    };
    let is_primary = args.primary;
    let settings = settings(&args);
    let (cfg, api_sock) = config(&args, snapshot.as_ref())?;
    // Blocked before any thread exists, so only the device loop ever sees them.
    let signals = event_loop::SignalFd::block_and_open().context("setting up signal handling")?;
    // Won before the guest exists: a node that may not run it builds nothing. (After the
    // signals are blocked: the etcd client may start threads.)
    let fence = connect_fence(&args)?
        .map(|f| claim_at_start(f, args.generation))
        .transpose()?;
    // Every VM can be protected later (`ctl protect`).
    let hooks = protect::Hooks::new();
    let connection = if is_primary {
        Some(connect_primary(&args, &cfg, &hooks, &settings)?)
    } else {
        None
    };
    // Dropped with its socket file if the VM cannot be built: nothing suggests otherwise.
    let control = bind_control(api_sock.as_ref())?;
    let vm = vm::build(cfg, snapshot.as_ref(), hooks.seams())?;
    drop(snapshot);
    let role = match connection {
        Some(c) => Role::Primary(Box::new(c.into_primary(&vm, &hooks, &settings, None)?)),
        None => Role::Standalone,
    };
    let protectable = protect::Protectable {
        hooks,
        settings,
        generation: args.generation,
        took_over: None,
        fence,
    };
    finish(&vm, &signals, control, role, protectable)
}

fn run_secondary(args: RunArgs) -> anyhow::Result<()> {
    let signals =
        Arc::new(event_loop::SignalFd::block_and_open().context("setting up signal handling")?);
    // Until it runs a guest, SIGTERM/SIGINT simply end the secondary.
    let running = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (signals, running) = (signals.clone(), running.clone());
        std::thread::spawn(move || {
            while !running.load(std::sync::atomic::Ordering::SeqCst) {
                if signals.wait(100) {
                    tracing::info!("stopped (secondary)");
                    std::process::exit(0);
                }
            }
        })
    };
    let control = bind_control(args.api_sock.as_ref())?;
    let fence = connect_fence(&args)?;
    let took = match secondary::run(
        secondary::SecondaryConfig {
            listen: args.listen.clone().context("--secondary needs --listen")?,
            disks: disk_configs(&args.disk),
            tap: args.tap.clone(),
            serial: serial_out(&args.serial),
            timeout: Duration::from_millis(args.failover_timeout_ms),
            generation: args.generation.saturating_sub(1),
            fence,
        },
        control,
    )? {
        secondary::Outcome::TookOver(took) => took,
        secondary::Outcome::GuestEnded(why) => {
            tracing::info!("{why}: nothing left to protect; the secondary ends");
            return Ok(());
        }
    };
    running.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = watcher.join();
    secondary::refuse_stale_primaries(took.listener, took.generation);
    let fence = took
        .fence
        .map(|(f, owner)| fencing::Fencing::start(f, Some(owner)))
        .transpose()?;
    let protectable = protect::Protectable {
        hooks: took.hooks,
        settings: settings(&args),
        generation: took.generation,
        took_over: Some(took.info.clone()),
        fence,
    };
    finish(
        &took.vm,
        &signals,
        took.control,
        Role::TookOver,
        protectable,
    )
}

/// Runs the device loop until the VM ends, and says how it ended.
fn finish(
    vm: &vm::Vm,
    signals: &event_loop::SignalFd,
    control: Option<ControlServer>,
    mut role: Role,
    mut protectable: protect::Protectable,
) -> anyhow::Result<()> {
    let reason = event_loop::run(vm, signals, control.as_ref(), &mut role, &mut protectable)
        .context("device loop")?;
    if let Role::Primary(p) = &role {
        say_goodbye(&p.link, &reason);
    }
    drop(control);
    use std::io::Write;
    let _ = std::io::stdout().flush();
    match reason {
        ExitReason::GuestEnded(how) => {
            tracing::info!("guest ended ({how})");
            Ok(())
        }
        ExitReason::Stopped => {
            tracing::info!("stopped");
            Ok(())
        }
        ExitReason::HandedOver(epoch) => {
            tracing::info!("handed the guest over to the secondary at epoch {epoch}");
            Ok(())
        }
        ExitReason::TripleFault { vcpu } => {
            bail!("guest triple fault on vCPU {vcpu} (the guest crashed)")
        }
        ExitReason::Failed { vcpu, why } => bail!("vCPU {vcpu}: {why}"),
        ExitReason::Fenced(line) => bail!("{line}"),
    }
}

/// How long a primary that ends waits for its goodbye to be written.
const GOODBYE_WAIT: Duration = Duration::from_secs(1);

/// A primary whose guest ended on purpose tells its secondary, which then does not take
/// over. A guest that crashed, or a VMM that failed, says nothing: the secondary's last
/// checkpoint is the guest to go on with.
fn say_goodbye(link: &replication::Link, reason: &ExitReason) {
    use mcvmm_replication::messages::Farewell;
    let why = match reason {
        ExitReason::Stopped => Farewell::Stopped,
        ExitReason::GuestEnded(crate::vcpu::POWER_OFF) => Farewell::PoweredOff,
        ExitReason::GuestEnded(_) => Farewell::Rebooted,
        _ => return,
    };
    if link.is_lost() {
        return;
    }
    if link.goodbye(why, GOODBYE_WAIT) {
        tracing::info!("told the secondary goodbye: {}", why.says());
    } else {
        tracing::warn!(
            "the goodbye to the secondary ({}) could not be written within {} ms",
            why.says(),
            GOODBYE_WAIT.as_millis()
        );
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
    if let Err(e) = log::init(cli.log_level.as_deref(), cli.log_format) {
        eprintln!("mcvmm: {e}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::Ctl { api_sock, request } => {
            // A reader that went away (`| head`) ends `ctl` quietly, like any filter.
            // SAFETY: restores a default signal disposition; no other thread exists yet.
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
            api::request(&api_sock, &request.join(" "))
                .map_err(anyhow::Error::from)
                .and_then(|v| {
                    println!("{v:#}");
                    // A refused or failed request exits non-zero, so a script can tell.
                    match v.get("error") {
                        Some(serde_json::Value::String(e)) => bail!("request failed: {e}"),
                        Some(e) if !e.is_null() => bail!("request failed: {e}"),
                        _ => Ok(()),
                    }
                })
        }
    };
    match result {
        // vCPU threads may still be inside KVM_RUN; ending the process ends them.
        Ok(()) => std::process::exit(0),
        Err(e) => {
            tracing::error!("{}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}
