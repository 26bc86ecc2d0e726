//! Running a shell command with a time limit and streamed output: the same code runs
//! commands inside test hosts (labd) and on a local hardware-KVM machine.

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::host::Stream;

/// After the command exited, how long the pipes may stay quiet before the output is
/// considered complete: background children may hold them open, and what they print
/// later is not this command's.
const DRAIN: Duration = Duration::from_millis(300);

/// Runs `sh -c command` in `cwd` in a process group of its own; kills the group after
/// `timeout`. Returns (exit code, or 128+signal; timed out).
pub fn run_shell(
    command: &str,
    cwd: &Path,
    timeout: Duration,
    on_output: &mut dyn FnMut(Stream, &[u8]) -> std::io::Result<()>,
) -> std::io::Result<(i32, bool)> {
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()?;
    let pgid = child.id() as libc::pid_t;
    let (tx, rx) = mpsc::channel::<(Stream, Vec<u8>)>();
    let pump =
        |mut r: Box<dyn Read + Send>, stream: Stream, tx: mpsc::Sender<(Stream, Vec<u8>)>| {
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = r.read(&mut buf) {
                    if n == 0 || tx.send((stream, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            });
        };
    if let Some(s) = child.stdout.take() {
        pump(Box::new(s), Stream::Stdout, tx.clone());
    }
    if let Some(s) = child.stderr.take() {
        pump(Box::new(s), Stream::Stderr, tx.clone());
    }
    drop(tx);

    let deadline = Instant::now() + timeout;
    let result = loop {
        if let Ok((stream, data)) = rx.recv_timeout(Duration::from_millis(20)) {
            on_output(stream, &data)?;
        }
        if let Some(status) = child.try_wait()? {
            let code = status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
            break (code, false);
        }
        if Instant::now() >= deadline {
            // SAFETY: kill takes plain integers; a negative pid names the process group.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            let _ = child.wait();
            break (128 + libc::SIGKILL, true);
        }
    };
    // Keep forwarding while output still flows; stop at end of file on both pipes, or
    // after a quiet spell (a background child may hold the pipes open for ever).
    while let Ok((stream, data)) = rx.recv_timeout(DRAIN) {
        on_output(stream, &data)?;
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(cmd: &str, timeout_ms: u64) -> (i32, bool, String, String) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let (code, timed_out) = run_shell(
            cmd,
            Path::new("/"),
            Duration::from_millis(timeout_ms),
            &mut |s, d| {
                match s {
                    Stream::Stdout => out.extend_from_slice(d),
                    Stream::Stderr => err.extend_from_slice(d),
                }
                Ok(())
            },
        )
        .expect("run");
        (
            code,
            timed_out,
            String::from_utf8_lossy(&out).into(),
            String::from_utf8_lossy(&err).into(),
        )
    }

    #[test]
    fn status_and_both_streams_come_back() {
        assert_eq!(
            run("echo out; echo err >&2; exit 3", 5000),
            (3, false, "out\n".into(), "err\n".into())
        );
    }

    #[test]
    fn a_hanging_command_is_killed_with_its_children() {
        let (code, timed_out, out, _) = run("echo started; sleep 100 & sleep 100", 300);
        assert!(timed_out);
        assert_eq!(code, 128 + libc::SIGKILL);
        assert_eq!(out, "started\n");
    }
}
