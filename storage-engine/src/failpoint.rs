//! Named fault-injection points at the crash points that matter, through the `fail` crate and
//! compiled in only with the `failpoints` feature (the engine's own tests, and the binary they
//! drive, are built with it; a release build is not): without it every point is an empty
//! inline function.
//!
//! Configure a point with the `FAILPOINTS` environment variable (`name=action;name=action`, read
//! at start) or `fail::cfg` in a test. `fail`'s own actions work (`panic`, `print`, `off`, counts
//! like `1*return(error)`); the points here read `return(ARG)`:
//! - `return(delay:MS)` waits MS milliseconds (asynchronously where the point is async),
//! - `return(error)` makes the step fail as an I/O or store error would,
//! - `return(exit)` ends the process at once, as a crash there would (no cleanup, no flush).
//!
//! | point | where |
//! |---|---|
//! | `journal.after_write` | a journal batch is durable, not yet applied in memory nor acknowledged |
//! | `target.local_leg` | a target's write on this node's replica, before it takes the fence |
//! | `target.remote_legs` | a target's write, before it is sent to the peers |
//! | `membership.before_cas` / `membership.after_cas` | around the compare-and-swap of the in-sync set |
//! | `resync.copy` | resync read a region from the source and has not written it to the replica |
//! | `replica.write` | a replica admitted a WRITE (its epoch checked, the fence held) and has not applied it |

/// Reads `FAILPOINTS` from the environment (a daemon calls this once at start; tests use
/// `fail::cfg`). Without the feature it does nothing and the points stay empty.
pub fn configure_from_env() {
    #[cfg(feature = "failpoints")]
    if std::env::var_os("FAILPOINTS").is_some() {
        // The scenario lives as long as the process.
        std::mem::forget(fail::FailScenario::setup());
        tracing::warn!("failpoints configured from FAILPOINTS: this build injects faults");
    }
}

/// What a configured point asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hit {
    /// Fail the step.
    Error,
    /// Wait this long, then go on.
    Delay(std::time::Duration),
}

/// The action of point `name` now: None when it is not configured (always, without the
/// feature).
#[cfg(feature = "failpoints")]
fn eval(name: &str) -> Option<Hit> {
    let arg = fail::eval(name, |arg| arg.unwrap_or_default())?;
    if arg == "exit" {
        tracing::error!(failpoint = name, "failpoint: exiting the process");
        std::process::exit(86);
    }
    match arg.strip_prefix("delay:").and_then(|ms| ms.parse().ok()) {
        Some(ms) => Some(Hit::Delay(std::time::Duration::from_millis(ms))),
        None => Some(Hit::Error),
    }
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
fn eval(_: &str) -> Option<Hit> {
    None
}

/// An async point: waits for a delay; Err for an injected failure.
pub async fn point(name: &str) -> Result<(), Injected> {
    match eval(name) {
        None => Ok(()),
        Some(Hit::Delay(d)) => {
            tokio::time::sleep(d).await;
            Ok(())
        }
        Some(Hit::Error) => Err(Injected(name.to_string())),
    }
}

/// A point on a blocking path (the journal): a delay sleeps the thread.
pub fn point_blocking(name: &str) -> Result<(), Injected> {
    match eval(name) {
        None => Ok(()),
        Some(Hit::Delay(d)) => {
            std::thread::sleep(d);
            Ok(())
        }
        Some(Hit::Error) => Err(Injected(name.to_string())),
    }
}

/// A failure injected at a named point.
#[derive(Debug, thiserror::Error)]
#[error("failure injected at failpoint {0}")]
pub struct Injected(pub String);

impl From<Injected> for std::io::Error {
    fn from(e: Injected) -> std::io::Error {
        std::io::Error::other(e.to_string())
    }
}

#[cfg(all(test, feature = "failpoints"))]
mod tests {
    use super::*;

    #[tokio::test]
    async fn configured_points_fail_or_wait_and_others_pass() {
        let _s = fail::FailScenario::setup();
        assert!(point("test.unset").await.is_ok());
        fail::cfg("test.err", "1*return(error)").unwrap();
        assert!(point("test.err").await.is_err());
        assert!(point("test.err").await.is_ok(), "only once");
        fail::cfg("test.delay", "return(delay:30)").unwrap();
        let t0 = std::time::Instant::now();
        point("test.delay").await.unwrap();
        assert!(t0.elapsed() >= std::time::Duration::from_millis(30));
        fail::cfg("test.block", "return(error)").unwrap();
        assert_eq!(point_blocking("test.block").unwrap_err().0, "test.block");
    }
}
