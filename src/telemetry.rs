//! Logging setup. Logs go to stderr, as text or JSON (`telemetry.log_format`); `RUST_LOG`
//! overrides the default filter.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// openraft logs every election and heartbeat problem at info and above; keep it to warnings.
const DEFAULT_FILTER: &str = "info,openraft=warn";

pub fn init_logging(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
