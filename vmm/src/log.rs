//! What mcvmm tells its operator, on stderr, through `tracing`: every line names its level
//! (an info line reads `mcvmm: ...`, the others `mcvmm: warning: ...`, `mcvmm: error: ...`,
//! `mcvmm: debug: ...`), so the words an operator greps for stay put while a filter can
//! quiet or widen them. `--log-level` or `MCVMM_LOG` takes a level (`warn`) or a
//! `tracing` filter (`info,mcvmm_replication=debug`); `--log-format json` writes one JSON
//! object a line for machines.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log filter {spec:?}: {why}")]
    Filter { spec: String, why: String },
    #[error("logging was set up already")]
    Twice,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `mcvmm: [level: ]message`, for people.
    Text,
    /// One JSON object a line (timestamp, level, target, message and fields).
    Json,
}

/// The human format: no timestamp (a supervisor adds its own), the level where it is
/// not plain information.
struct Plain;

impl<S, N> FormatEvent<S, N> for Plain
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        w.write_str("mcvmm: ")?;
        w.write_str(level_prefix(*event.metadata().level()))?;
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

fn level_prefix(level: Level) -> &'static str {
    match level {
        Level::ERROR => "error: ",
        Level::WARN => "warning: ",
        Level::INFO => "",
        Level::DEBUG => "debug: ",
        Level::TRACE => "trace: ",
    }
}

/// The filter: `spec` if given, else `MCVMM_LOG`, else `info`.
fn filter(spec: Option<&str>) -> Result<EnvFilter, LogError> {
    let spec = spec
        .map(str::to_string)
        .or_else(|| std::env::var("MCVMM_LOG").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "info".to_string());
    EnvFilter::try_new(&spec).map_err(|e| LogError::Filter {
        spec,
        why: e.to_string(),
    })
}

/// Sets up logging for the process.
pub fn init(spec: Option<&str>, format: LogFormat) -> Result<(), LogError> {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(spec)?)
        .with_writer(std::io::stderr);
    let done = match format {
        LogFormat::Text => builder.event_format(Plain).try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    done.map_err(|_| LogError::Twice)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_filter_is_named_and_levels_read_as_words() {
        let e = filter(Some("info,=nonsense[")).expect_err("refused");
        assert!(e.to_string().contains("nonsense"), "{e}");
        assert!(filter(Some("warn")).is_ok());
        assert_eq!(level_prefix(Level::INFO), "");
        assert_eq!(level_prefix(Level::WARN), "warning: ");
    }
}
