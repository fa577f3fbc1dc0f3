//! The one tracing setup every Strata binary uses: events to stderr, filtered by `STRATA_LOG`
//! (an env-filter directive such as `info` or `strata_engine=debug,warn`; default `info`, rustls's handshake notes left out),
//! coloured only on a terminal. Spans (volume and node ids on the data and control paths)
//! show as the event's context.

/// `info`, without rustls's per-handshake notes on what clients send (an IP address as SNI,
/// which NBD clients reaching an engine by address always do).
const DEFAULT: &str = "info,rustls::msgs=error";

/// Installs the subscriber; call once at the start of `main`.
pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("STRATA_LOG").unwrap_or_else(|_| DEFAULT.into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
