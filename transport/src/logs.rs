//! Logging of both daemons: `tracing` to stderr, filtered by `RUST_LOG` (default: `default_level`),
//! as human text (colours only at a terminal) or, with `--log-format json`, one JSON object per
//! event for log pipelines.

/// Set up logging in `format` (`text` or `json`).
pub fn init(format: &str, default_level: &str) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        "text" => builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init(),
        "json" => builder.json().with_current_span(false).init(),
        other => return Err(format!("--log-format {other:?}: use text or json")),
    }
    Ok(())
}
