//! Failpoints: named places where a reliability test makes payguard crash, stall
//! or fail on purpose, to prove that nothing acknowledged is lost and nothing is
//! charged twice when it happens in production.
//!
//! Built on the `fail` crate and compiled in only with the `failpoints` feature
//! (test builds: the CLI's dev-dependency turns it on), so a release binary has
//! none. A test arms them through the `FAILPOINTS` environment variable with the
//! crate's syntax, `name=[p%][cnt*]return(ACTION)[->…];name=…`, where ACTION is
//! one of ours:
//!
//! * `exit` or `exit:CODE`: the process ends at once (default code 86), like
//!   `kill -9` at exactly that line: no destructor, no flush, no reply.
//! * `pause:MS`: the task waits MS milliseconds without blocking its thread.
//! * `error`: the step fails as if the database had gone away (503 upstream).
//!
//! | name | where | what a crash there proves |
//! |---|---|---|
//! | [`AFTER_LOCK`] | cross-instance lock taken, nothing written yet | a holder that dies strands its order only until the lock's TTL |
//! | [`MID_BATCH`] | half of a group commit's ops executed, not committed | the batch is all or nothing; none of it was acknowledged |
//! | [`AFTER_COMMIT`] | batch durable, no caller answered | retries replay the committed result |

use std::time::Duration;

/// Between taking the cross-instance (Redis) locks and writing the batch.
pub const AFTER_LOCK: &str = "engine.after_lock";
/// Inside a store transaction, after half of the batch's ops ran, before commit.
pub const MID_BATCH: &str = "store.mid_batch";
/// After a store commit that moved money, before any caller hears of it.
pub const AFTER_COMMIT: &str = "store.after_commit";

/// Exit code of an `exit` action without one of its own.
pub const EXIT_CODE_DEFAULT: i32 = 86;

/// What an armed failpoint asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Exit(i32),
    Pause(Duration),
    Error,
}

impl Action {
    /// Parses our action text (the argument of the `fail` crate's `return(…)`).
    pub fn parse(arg: &str) -> Result<Action, String> {
        let arg = arg.trim();
        let (verb, value) = match arg.split_once(':') {
            Some((v, n)) => (v, Some(n)),
            None => (arg, None),
        };
        let number = |what: &str| -> Result<u64, String> {
            value
                .ok_or_else(|| format!("failpoint action {arg:?} needs {what}"))?
                .parse()
                .map_err(|_| format!("failpoint action {arg:?}: {what} must be a number"))
        };
        match verb {
            "exit" if value.is_none() => Ok(Action::Exit(EXIT_CODE_DEFAULT)),
            "exit" => Ok(Action::Exit(
                i32::try_from(number("an exit code")?).map_err(|e| e.to_string())?,
            )),
            "pause" => Ok(Action::Pause(Duration::from_millis(number(
                "milliseconds",
            )?))),
            "error" if value.is_none() => Ok(Action::Error),
            _ => Err(format!(
                "unknown failpoint action {arg:?} (exit[:CODE], pause:MS, error)"
            )),
        }
    }
}

/// Whether failpoints are compiled into this build.
pub const ENABLED: bool = cfg!(feature = "failpoints");

/// Arms the failpoints named in `FAILPOINTS`; call once at process start and
/// keep the guard. Without the feature it refuses a set `FAILPOINTS` rather than
/// let a test believe a fault was injected.
pub fn arm_from_env() -> Result<Armed, String> {
    let spec = std::env::var("FAILPOINTS").unwrap_or_default();
    if spec.trim().is_empty() {
        return Ok(Armed::none());
    }
    if !ENABLED {
        return Err(format!(
            "FAILPOINTS={spec:?} is set, but this build has no failpoints (build with --features failpoints)"
        ));
    }
    arm(&spec)
}

#[cfg(feature = "failpoints")]
fn arm(spec: &str) -> Result<Armed, String> {
    for part in spec.split(';').filter(|p| !p.trim().is_empty()) {
        let (name, actions) = part
            .split_once('=')
            .ok_or_else(|| format!("failpoint {part:?} has no `=`"))?;
        // Check our own action texts up front: a typo must stop the test, not
        // silently inject nothing.
        for ret in actions.split("->") {
            if let Some(arg) = ret
                .split_once("return(")
                .and_then(|(_, rest)| rest.strip_suffix(')'))
            {
                Action::parse(arg)?;
            }
        }
        tracing::warn!(
            event = "failpoint_armed",
            failpoint = name.trim(),
            actions = actions.trim()
        );
    }
    Ok(Armed {
        _scenario: Some(fail::FailScenario::setup()),
    })
}

#[cfg(not(feature = "failpoints"))]
fn arm(_spec: &str) -> Result<Armed, String> {
    Ok(Armed::none())
}

impl Armed {
    fn none() -> Self {
        Armed {
            #[cfg(feature = "failpoints")]
            _scenario: None,
        }
    }
}

/// Keeps the failpoints armed while alive.
pub struct Armed {
    #[cfg(feature = "failpoints")]
    _scenario: Option<fail::FailScenario<'static>>,
}

/// The action armed at `name`, if any fires now. Free when not compiled in.
#[inline]
pub fn eval(name: &'static str) -> Option<Action> {
    #[cfg(feature = "failpoints")]
    {
        let action = fail::eval(name, |arg| {
            Action::parse(arg.as_deref().unwrap_or("")).unwrap_or_else(|e| panic!("{e}"))
        })?;
        tracing::warn!(event = "failpoint_hit", failpoint = name, action = ?action);
        Some(action)
    }
    #[cfg(not(feature = "failpoints"))]
    {
        let _ = name;
        None
    }
}

/// Runs `name`'s action on a blocking thread (the SQLite writer): `exit` ends the
/// process, `pause` sleeps the thread; `error` is returned for the caller to fail.
pub fn hit_blocking(name: &'static str) -> Option<Action> {
    match eval(name)? {
        Action::Exit(code) => std::process::exit(code),
        Action::Pause(d) => {
            std::thread::sleep(d);
            None
        }
        Action::Error => Some(Action::Error),
    }
}

/// Like [`hit_blocking`] for async code: `pause` sleeps the task, not the thread.
pub async fn hit(name: &'static str) -> Option<Action> {
    match eval(name)? {
        Action::Exit(code) => std::process::exit(code),
        Action::Pause(d) => {
            tokio::time::sleep(d).await;
            None
        }
        Action::Error => Some(Action::Error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_parse_and_typos_are_refused() {
        assert_eq!(Action::parse("exit"), Ok(Action::Exit(86)));
        assert_eq!(Action::parse("exit:3"), Ok(Action::Exit(3)));
        assert_eq!(
            Action::parse("pause:250"),
            Ok(Action::Pause(Duration::from_millis(250)))
        );
        assert_eq!(Action::parse("error"), Ok(Action::Error));
        for bad in ["", "exit:x", "pause", "pause:-1", "crash", "error:1"] {
            assert!(Action::parse(bad).is_err(), "{bad:?} must be refused");
        }
    }
}
