//! The failover part of `mcvmm-bench-replication`: the same drill rounds fenced (etcd on
//! the lab network) and unfenced, one after the other in one run, so that what the
//! fence adds to a takeover is read as a ratio of two measures taken together.

use serde::Serialize;

use crate::drill::{self, Kill, Round};

/// What one mode's rounds gave.
#[derive(Debug, Serialize)]
pub struct ModeResult {
    pub fenced: bool,
    pub rounds: Vec<Round>,
    /// Why a part of the mode's rounds stopped early.
    pub errors: Vec<String>,
}

impl ModeResult {
    /// The rounds of `kill` that timed a failover: not those whose primary had died by
    /// itself before the kill (the secondary had taken over already).
    fn of(&self, kill: Kill) -> impl Iterator<Item = &Round> {
        self.rounds
            .iter()
            .filter(move |r| r.kill == kill && r.primary_died_first.is_none())
    }
}

/// Process kills, then host power-offs (each on test hosts of its own), fenced and
/// unfenced. Unfenced, a powered-off host is a silence, and silence never starts the
/// guest elsewhere (only the operator's `ctl failover` does): no host rounds there.
pub fn run(
    process_rounds: usize,
    host_rounds: usize,
    mem_mib: u32,
    log: &mut dyn FnMut(&str),
) -> Vec<ModeResult> {
    [true, false]
        .into_iter()
        .map(|fenced| {
            let mode = if fenced { "fenced" } else { "unfenced" };
            let mut result = ModeResult {
                fenced,
                rounds: Vec::new(),
                errors: Vec::new(),
            };
            let hosts = if fenced { host_rounds } else { 0 };
            // Apart, so that a failed host round keeps the process rounds.
            for (process_rounds, host_rounds) in [(process_rounds, 0), (0, hosts)] {
                if process_rounds + host_rounds == 0 {
                    continue;
                }
                let opts = drill::Options {
                    process_rounds,
                    partition_rounds: 0,
                    stall_rounds: 0,
                    host_rounds,
                    guest_mem_mib: mem_mib,
                    seed: 7,
                    fenced,
                };
                match drill::run(&opts, &mut |m: &str| log(&format!("{mode}: {m}"))) {
                    Ok(r) => result.rounds.extend(r),
                    Err(e) => {
                        log(&format!("WARNING: {mode} failover rounds stopped: {e}"));
                        result.errors.push(e);
                    }
                }
            }
            result
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

fn cell(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.0}"))
}

/// The table: per mode and way of failing, the first answer on a new connection after
/// the kill (median, max, and the median without each lab's first takeover, which runs
/// code the test hosts' emulator has not translated yet), the client's in-flight wait,
/// detection to the guest running on the secondary (claim included), and the claim
/// alone; then the ratio of medians.
pub fn table(results: &[ModeResult]) -> String {
    let mut out = String::from(
        "| mode | failure | rounds | first answer median (ms) | max (ms) | median, each lab's first left out (ms) | in-flight wait median (ms) | detected → running median (ms) | fence claim median (ms) |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for m in results {
        for (kill, name) in [
            (Kill::Process, "process kill"),
            (Kill::Host, "host power-off"),
        ] {
            let rounds: Vec<&Round> = m.of(kill).collect();
            if kill == Kill::Host && !m.fenced {
                out += "| unfenced | host power-off | - | no takeover: without the fence a silence never starts the guest (only `ctl failover` does) | | | | | |\n";
                continue;
            }
            let first: Vec<f64> = rounds.iter().map(|r| r.failover_ms as f64).collect();
            let max = first
                .iter()
                .copied()
                .fold(None, |a: Option<f64>, x| Some(a.map_or(x, |a| a.max(x))));
            let warm: Vec<f64> = rounds
                .iter()
                .filter(|r| !r.first_on_lab)
                .map(|r| r.failover_ms as f64)
                .collect();
            out += &format!(
                "| {} | {name} | {} | {} | {} | {} | {} | {} | {} |\n",
                if m.fenced { "fenced" } else { "unfenced" },
                rounds.len(),
                cell(median(first)),
                cell(max),
                cell(median(warm)),
                cell(median(
                    rounds.iter().map(|r| r.client_stall_ms as f64).collect()
                )),
                cell(median(rounds.iter().map(|r| r.takeover_build_ms).collect())),
                cell(median(
                    rounds.iter().filter_map(|r| r.fence_claim_ms).collect()
                )),
            );
        }
    }
    for (kill, name) in [
        (Kill::Process, "process kill"),
        (Kill::Host, "host power-off"),
    ] {
        let med = |fenced: bool| {
            results
                .iter()
                .find(|m| m.fenced == fenced)
                .and_then(|m| median(m.of(kill).map(|r| r.failover_ms as f64).collect()))
        };
        if let (Some(f), Some(u)) = (med(true), med(false)) {
            if u > 0.0 {
                out += &format!(
                    "\n{name}: fenced / unfenced first answer, medians: {:.2}",
                    f / u
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_nothing_print_as_a_dash() {
        assert_eq!(cell(median(Vec::new())), "-");
        assert_eq!(cell(median(vec![3.0, 1.0, 2.0])), "2");
        let empty = [ModeResult {
            fenced: true,
            rounds: Vec::new(),
            errors: Vec::new(),
        }];
        assert!(table(&empty).contains("| fenced | process kill | 0 | - |"));
    }
}
