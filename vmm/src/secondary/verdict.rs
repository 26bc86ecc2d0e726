//! What the end of a primary's stream means for the guest (see the module above).

use std::io::ErrorKind;
use std::time::Duration;

use mcvmm_replication::secondary::Ended;

/// What the secondary does once a primary's stream ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The primary is gone for good (or handed over, or the operator says so): take over,
    /// with a fence only once this node won it.
    TakeOver(String),
    /// The primary is alive, or ended the protection on purpose: drop what it sent and
    /// wait for the next one.
    Wait(String),
    /// Without a fence nothing says whether the primary lives: keep the last commit for
    /// the operator's `ctl failover`, and wait.
    Keep(String),
    /// The guest ended on the primary: nothing is left to protect.
    End(String),
}

/// `silent_for`: since the last byte of the primary; `timeout`: `--failover-timeout-ms`.
pub fn verdict(
    ended: &Ended,
    silent_for: Duration,
    timeout: Duration,
    fenced: bool,
    operator: bool,
) -> Verdict {
    let died = silent_for < timeout;
    match ended {
        Ended::Goodbye(f) if f.guest_ended() => Verdict::End(f.says().to_string()),
        Ended::Goodbye(f) => Verdict::Wait(f.says().to_string()),
        Ended::Refused(e) => Verdict::Wait(format!(
            "dropped the primary: {e}; not taking over (it is alive)"
        )),
        Ended::Takeover(n) => Verdict::TakeOver(format!("planned switch at epoch {n}")),
        other if operator => {
            Verdict::TakeOver(format!("operator asked for failover ({})", describe(other, silent_for)))
        }
        Ended::Closed(e) if died => Verdict::TakeOver(format!(
            "primary's process died: its connection closed ({e}) while its frames were arriving"
        )),
        Ended::ReplyFailed(e) if died && closed_by_peer(e.kind()) => Verdict::TakeOver(format!(
            "primary's process died: its connection was closed ({e}) while its frames were arriving"
        )),
        other if fenced => Verdict::TakeOver(format!(
            "primary lost ({}); the fence decides",
            describe(other, silent_for)
        )),
        other => Verdict::Keep(format!(
            "{}: without --etcd that proves nothing, so no takeover (`ctl failover` only if you know the primary is dead)",
            describe(other, silent_for)
        )),
    }
}

fn closed_by_peer(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
    )
}

fn describe(ended: &Ended, silent_for: Duration) -> String {
    match ended {
        Ended::Closed(e) => format!(
            "the connection closed ({e}) after {} ms of silence",
            silent_for.as_millis()
        ),
        Ended::Silent(_) => format!("silent for {} ms", silent_for.as_millis()),
        Ended::ReplyFailed(e) => format!("acknowledgements could not be written: {e}"),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mcvmm_replication::messages::Farewell;
    use mcvmm_replication::secondary::ReceiveError;
    use mcvmm_replication::wire::WireError;

    const T: Duration = Duration::from_millis(500);

    fn closed() -> Ended {
        Ended::Closed(ReceiveError::Wire(WireError::Closed))
    }

    fn silent() -> Ended {
        Ended::Silent(ReceiveError::Wire(WireError::TimedOut(500)))
    }

    fn kind(v: &Verdict) -> &'static str {
        match v {
            Verdict::TakeOver(_) => "take over",
            Verdict::Wait(_) => "wait",
            Verdict::Keep(_) => "keep",
            Verdict::End(_) => "end",
        }
    }

    #[test]
    fn without_a_fence_only_a_death_or_the_operator_starts_the_guest() {
        let fast = Duration::from_millis(60);
        let slow = Duration::from_secs(3);
        let cases = [
            (closed(), fast, false, "take over"),
            (closed(), slow, false, "keep"),
            (silent(), slow, false, "keep"),
            (silent(), slow, true, "take over"),
            (closed(), slow, true, "take over"),
            (
                Ended::ReplyFailed(std::io::Error::from(ErrorKind::BrokenPipe)),
                fast,
                false,
                "take over",
            ),
            (
                Ended::ReplyFailed(std::io::Error::from(ErrorKind::WouldBlock)),
                fast,
                false,
                "keep",
            ),
            (Ended::Takeover(4), fast, false, "take over"),
            (Ended::Refused(ReceiveError::NoState(3)), fast, true, "wait"),
        ];
        for (ended, quiet, operator, want) in cases {
            let v = verdict(&ended, quiet, T, false, operator);
            assert_eq!(
                kind(&v),
                want,
                "{ended:?} after {quiet:?}, operator {operator}: {v:?}"
            );
        }
    }

    #[test]
    fn with_a_fence_any_loss_goes_to_the_fence_and_a_goodbye_never_does() {
        for ended in [closed(), silent()] {
            let v = verdict(&ended, Duration::from_secs(9), T, true, false);
            assert_eq!(kind(&v), "take over", "{v:?}");
        }
        for (why, want) in [
            (Farewell::Stopped, "end"),
            (Farewell::PoweredOff, "end"),
            (Farewell::Rebooted, "end"),
            (Farewell::Unprotected, "wait"),
            (Farewell::SecondaryDropped, "wait"),
        ] {
            for fenced in [false, true] {
                let v = verdict(&Ended::Goodbye(why), Duration::ZERO, T, fenced, true);
                assert_eq!(kind(&v), want, "{why:?}: {v:?}");
            }
        }
    }
}
