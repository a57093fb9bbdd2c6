//! Signals: SIGINT, SIGTERM and SIGHUP all start the same graceful stop; a second one
//! during the stop exits at once.
//!
//! Fly sends the app's `kill_signal` (SIGINT by default), then SIGKILL after
//! `kill_timeout`; an operator's Ctrl-C is SIGINT; most other platforms send SIGTERM. All
//! of them mean "drain". SIGHUP (the terminal or supervisor that started the process went
//! away) has nothing to reload here, and dropping every tunnel without a word is the
//! worst answer to it, so it drains too. SIGQUIT keeps its default: the emergency stop,
//! at once and with a core dump, no drain (agents see their tunnels drop and reconnect).

use futures_util::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use tracing::{error, warn};

/// Exit code when a second signal cuts a drain short (128 + SIGINT, as a shell reports
/// an interrupted process).
pub const EXIT_INTERRUPTED: i32 = 130;

/// Resolves on the first SIGINT, SIGTERM or SIGHUP. A second one exits the process at once with
/// [`EXIT_INTERRUPTED`]: the operator (or platform) insists.
///
/// If the signal handlers cannot be installed this never resolves (logged): the process
/// then stops only by SIGKILL, which is what it would get anyway.
pub async fn signal_then_exit_on_second() {
    let mut signals = match Signals::new([SIGINT, SIGTERM, SIGHUP]) {
        Ok(signals) => signals,
        Err(err) => {
            error!(%err, "cannot listen for SIGINT/SIGTERM/SIGHUP; stop with SIGKILL");
            return std::future::pending().await;
        }
    };
    let Some(first) = signals.next().await else {
        return std::future::pending().await;
    };
    warn!(
        signal = name(first),
        "stop requested; draining (a second signal exits at once)"
    );
    tokio::spawn(async move {
        if let Some(second) = signals.next().await {
            error!(
                signal = name(second),
                "second signal during the drain; exiting now"
            );
            std::process::exit(EXIT_INTERRUPTED);
        }
    });
}

fn name(signal: i32) -> &'static str {
    match signal {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        SIGHUP => "SIGHUP",
        _ => "signal",
    }
}
