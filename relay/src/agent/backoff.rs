//! The reconnect policy: how long the agent waits before its next connect attempt.
//!
//! Pure: no clock, no I/O. The randomness is injected ([`Jitter`]) and so is how long the
//! ended tunnel was registered, so every rule below is unit-tested exactly.
//!
//! - delay = jitter × min(cap, base × 2^attempt), jitter uniform in **[0.5, 1.0]**
//!   ("equal jitter": never less than half the step, so a fleet spreads out without any
//!   agent retrying sooner than the schedule meant); `attempt` is 0 for the first retry
//!   and grows by one per failure.
//! - The cap is `--backoff-cap` for transport failures and `--auth-backoff-cap` after the
//!   relay refused the credential.
//! - `attempt` starts over only when a tunnel stayed registered for `--stable-after`
//!   ([`Backoff::mark_stable`], or an ended tunnel that lived that long), never on a bare
//!   open; and at once on a drain, which waits uniform [0, `--drain-spread`].
//! - Replaced (close 4002): wait the cap (no jitter: the other agent is there to stay).
//! - HTTP 429/503 with `Retry-After`: max(backoff, Retry-After).
//! - HTTP 503 with `Retry-After: 0` (a draining relay saying "not here"): try elsewhere
//!   now, within the drain spread, without growing the backoff; if that keeps happening
//!   (more times in a row than there are relay URLs) the current step is waited, still
//!   without growing, so a single URL that keeps landing on a draining relay is not
//!   hammered.

use std::fmt;
use std::time::Duration;

use rand::{Rng as _, SeedableRng as _};

/// What ended a connect attempt or a tunnel, as far as the backoff cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Transport failure, connect timeout, silence, or a close the relay meant as "come
    /// back later" (1000, 1001, 1009, 1011, ...): normal backoff.
    Failed,
    /// HTTP 401/403 on the upgrade or close 1008: the credential is the problem.
    AuthFailed,
    /// Close 4002: another agent registered this hostId.
    Replaced,
    /// HTTP 429 or 503 with this `Retry-After` (zero when absent or unusable).
    Throttled {
        /// The relay's `Retry-After`, already parsed and clamped.
        retry_after: Duration,
    },
    /// HTTP 503 with `Retry-After: 0`: this relay is draining; go to another one now.
    TryElsewhere,
    /// A drain notice (`{"type":"drain"}` or close 4001): reconnect at once.
    Drained,
}

impl Outcome {
    /// Whether this outcome is a failure of the agent's attempt (counted in
    /// `consecutive_failures`). A drain is the relay's orderly goodbye, and a draining
    /// relay's refusal (`Retry-After: 0`) the same goodbye seen from the next attempt: a
    /// routine restart of the only relay must not read as failures on the status page.
    pub fn is_failure(self) -> bool {
        !matches!(self, Outcome::Drained | Outcome::TryElsewhere)
    }
}

/// The schedule's parameters (from `AgentArgs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// First step of the exponential schedule.
    pub base: Duration,
    /// Longest step after transport failures.
    pub cap: Duration,
    /// Longest step after credential failures.
    pub auth_cap: Duration,
    /// Longest random delay after a drain.
    pub drain_spread: Duration,
    /// How long a tunnel must stay registered for the schedule to start over.
    pub stable_after: Duration,
    /// How many relay URLs the agent rotates over: that many "try elsewhere" answers in a
    /// row are retried within the drain spread.
    pub relays: u32,
}

/// Random factors for the schedule: each call yields a number uniform in [0, 1].
pub struct Jitter(Box<dyn FnMut() -> f64 + Send>);

impl Jitter {
    /// Fresh randomness from the OS-seeded generator.
    pub fn random() -> Jitter {
        Jitter::from_rng(rand::rngs::StdRng::from_os_rng())
    }

    /// A reproducible sequence (tests).
    pub fn seeded(seed: u64) -> Jitter {
        Jitter::from_rng(rand::rngs::StdRng::seed_from_u64(seed))
    }

    /// Always `unit` (clamped to [0, 1]): `fixed(1.0)` gives the top of every range.
    pub fn fixed(unit: f64) -> Jitter {
        let unit = unit.clamp(0.0, 1.0);
        Jitter(Box::new(move || unit))
    }

    fn from_rng(mut rng: rand::rngs::StdRng) -> Jitter {
        Jitter(Box::new(move || rng.random_range(0.0..=1.0)))
    }

    fn unit(&mut self) -> f64 {
        (self.0)().clamp(0.0, 1.0)
    }
}

impl fmt::Debug for Jitter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Jitter")
    }
}

/// The reconnect state of one agent.
#[derive(Debug)]
pub struct Backoff {
    policy: Policy,
    jitter: Jitter,
    /// Exponent of the next step.
    attempt: u32,
    /// Failed attempts since the last stable tunnel (operator status).
    failures: u32,
    /// "Try elsewhere" answers in a row.
    elsewhere_streak: u32,
}

// === impl Backoff ===

impl Backoff {
    /// A schedule at its start.
    pub fn new(policy: Policy, jitter: Jitter) -> Backoff {
        Backoff {
            policy,
            jitter,
            attempt: 0,
            failures: 0,
            elsewhere_streak: 0,
        }
    }

    /// The exponent of the next step (0 for the first retry).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Failed attempts since the last tunnel that stayed registered for `stable_after`.
    pub fn consecutive_failures(&self) -> u32 {
        self.failures
    }

    /// The current tunnel has stayed registered for `stable_after`: start over.
    pub fn mark_stable(&mut self) {
        self.attempt = 0;
        self.failures = 0;
        self.elsewhere_streak = 0;
    }

    /// Records how an attempt or tunnel ended and returns how long to wait before the next
    /// attempt. `registered_for` is how long the ended tunnel had been registered (`None`
    /// when it never was): a tunnel that lived `stable_after` resets the schedule first.
    pub fn next_delay(&mut self, outcome: Outcome, registered_for: Option<Duration>) -> Duration {
        if registered_for.is_some_and(|lived| lived >= self.policy.stable_after) {
            self.mark_stable();
        }
        if outcome.is_failure() {
            self.failures = self.failures.saturating_add(1);
        }
        if outcome != Outcome::TryElsewhere {
            self.elsewhere_streak = 0;
        }
        match outcome {
            Outcome::Drained => {
                self.attempt = 0;
                self.spread()
            }
            Outcome::TryElsewhere => {
                self.elsewhere_streak = self.elsewhere_streak.saturating_add(1);
                if self.elsewhere_streak <= self.policy.relays.max(1) {
                    self.spread()
                } else {
                    self.step(self.policy.cap)
                }
            }
            Outcome::Failed => self.grow(self.policy.cap),
            Outcome::AuthFailed => self.grow(self.policy.auth_cap),
            Outcome::Replaced => {
                self.attempt = self.attempt.saturating_add(1);
                self.policy.cap
            }
            Outcome::Throttled { retry_after } => self.grow(self.policy.cap).max(retry_after),
        }
    }

    /// The current step under `cap`, then one step further.
    fn grow(&mut self, cap: Duration) -> Duration {
        let delay = self.step(cap);
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    /// jitter × min(cap, base × 2^attempt), jitter in [0.5, 1.0].
    fn step(&mut self, cap: Duration) -> Duration {
        let factor = 0.5 + 0.5 * self.jitter.unit();
        exponential(self.policy.base, cap, self.attempt).mul_f64(factor)
    }

    /// Uniform in [0, drain_spread].
    fn spread(&mut self) -> Duration {
        self.policy.drain_spread.mul_f64(self.jitter.unit())
    }
}

/// min(cap, base × 2^attempt), without overflow.
fn exponential(base: Duration, cap: Duration, attempt: u32) -> Duration {
    2u32.checked_pow(attempt)
        .and_then(|factor| base.checked_mul(factor))
        .map_or(cap, |step| step.min(cap))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn policy() -> Policy {
        Policy {
            base: S,
            cap: 5 * S,
            auth_cap: 60 * S,
            drain_spread: Duration::from_millis(250),
            stable_after: 10 * S,
            relays: 1,
        }
    }

    fn top() -> Backoff {
        Backoff::new(policy(), Jitter::fixed(1.0))
    }

    fn secs(d: Duration) -> f64 {
        d.as_secs_f64()
    }

    #[test]
    fn schedule_doubles_from_base_to_the_cap() {
        let mut b = top();
        let got: Vec<f64> = (0..7)
            .map(|_| secs(b.next_delay(Outcome::Failed, None)))
            .collect();
        assert_eq!(got, [1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0]);
        assert_eq!(b.consecutive_failures(), 7);
    }

    #[test]
    fn jitter_at_zero_halves_every_step() {
        let mut b = Backoff::new(policy(), Jitter::fixed(0.0));
        let got: Vec<f64> = (0..4)
            .map(|_| secs(b.next_delay(Outcome::Failed, None)))
            .collect();
        assert_eq!(got, [0.5, 1.0, 2.0, 2.5]);
    }

    #[test]
    fn random_jitter_stays_within_half_to_full_step() {
        for seed in 0..50 {
            let mut b = Backoff::new(policy(), Jitter::seeded(seed));
            for attempt in 0..10u32 {
                let full = exponential(S, 5 * S, attempt);
                let d = b.next_delay(Outcome::Failed, None);
                assert!(
                    d >= full / 2 && d <= full,
                    "seed {seed} attempt {attempt}: {d:?}"
                );
            }
        }
    }

    #[test]
    fn huge_attempt_counts_stay_at_the_cap() {
        assert_eq!(exponential(S, 5 * S, 31), 5 * S);
        assert_eq!(exponential(S, 5 * S, 32), 5 * S);
        assert_eq!(exponential(S, 5 * S, u32::MAX), 5 * S);
        let mut b = top();
        for _ in 0..100 {
            b.next_delay(Outcome::Failed, None);
        }
        assert_eq!(b.next_delay(Outcome::Failed, None), 5 * S);
    }

    #[test]
    fn auth_failures_climb_to_the_auth_cap() {
        let mut b = top();
        let got: Vec<f64> = (0..8)
            .map(|_| secs(b.next_delay(Outcome::AuthFailed, None)))
            .collect();
        assert_eq!(got, [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]);
        // A transport failure after that is back under the normal cap.
        assert_eq!(b.next_delay(Outcome::Failed, None), 5 * S);
    }

    #[test]
    fn a_bare_open_or_a_short_registration_does_not_reset() {
        let mut b = top();
        b.next_delay(Outcome::Failed, None);
        b.next_delay(Outcome::Failed, None);
        // Upgraded but never registered (closed within the grace), then registered but
        // dropped after 9 s: the schedule keeps growing.
        assert_eq!(b.next_delay(Outcome::Failed, None), 4 * S);
        assert_eq!(b.next_delay(Outcome::Failed, Some(9 * S)), 5 * S);
        assert_eq!(b.attempt(), 4);
    }

    #[test]
    fn a_stable_registration_resets() {
        let mut b = top();
        for _ in 0..5 {
            b.next_delay(Outcome::Failed, None);
        }
        assert_eq!(b.next_delay(Outcome::Failed, Some(10 * S)), S);
        assert_eq!(b.consecutive_failures(), 1);

        for _ in 0..5 {
            b.next_delay(Outcome::AuthFailed, None);
        }
        b.mark_stable();
        assert_eq!((b.attempt(), b.consecutive_failures()), (0, 0));
        assert_eq!(b.next_delay(Outcome::Failed, None), S);
    }

    #[test]
    fn drain_resets_and_waits_within_the_spread() {
        let mut b = top();
        for _ in 0..5 {
            b.next_delay(Outcome::Failed, None);
        }
        assert_eq!(
            b.next_delay(Outcome::Drained, Some(S)),
            Duration::from_millis(250)
        );
        assert_eq!(b.attempt(), 0);
        assert_eq!(b.next_delay(Outcome::Failed, None), S);

        let mut b = Backoff::new(policy(), Jitter::fixed(0.0));
        assert_eq!(b.next_delay(Outcome::Drained, None), Duration::ZERO);
        for seed in 0..50 {
            let mut b = Backoff::new(policy(), Jitter::seeded(seed));
            let d = b.next_delay(Outcome::Drained, None);
            assert!(d <= Duration::from_millis(250), "{d:?}");
        }
    }

    #[test]
    fn a_drain_is_not_a_failure() {
        let mut b = top();
        b.next_delay(Outcome::Failed, None);
        b.next_delay(Outcome::Drained, None);
        assert_eq!(b.consecutive_failures(), 1);
    }

    #[test]
    fn replaced_waits_the_cap() {
        let mut b = Backoff::new(policy(), Jitter::seeded(7));
        assert_eq!(b.next_delay(Outcome::Replaced, Some(60 * S)), 5 * S);
        assert_eq!(b.next_delay(Outcome::Replaced, None), 5 * S);
    }

    #[test]
    fn throttled_waits_the_longer_of_backoff_and_retry_after() {
        let mut b = top();
        assert_eq!(
            b.next_delay(
                Outcome::Throttled {
                    retry_after: 30 * S
                },
                None
            ),
            30 * S
        );
        // Backoff 2 s beats Retry-After 1 s; the schedule grew all the same.
        assert_eq!(
            b.next_delay(Outcome::Throttled { retry_after: S }, None),
            2 * S
        );
        assert_eq!(
            b.next_delay(
                Outcome::Throttled {
                    retry_after: Duration::ZERO
                },
                None
            ),
            4 * S
        );
    }

    #[test]
    fn try_elsewhere_does_not_grow_the_backoff() {
        let mut b = Backoff::new(
            Policy {
                relays: 2,
                ..policy()
            },
            Jitter::fixed(1.0),
        );
        b.next_delay(Outcome::Failed, None);
        b.next_delay(Outcome::Failed, None);
        assert_eq!(b.attempt(), 2);
        // One "try elsewhere" per relay URL goes at once (within the drain spread)...
        assert_eq!(
            b.next_delay(Outcome::TryElsewhere, None),
            Duration::from_millis(250)
        );
        assert_eq!(
            b.next_delay(Outcome::TryElsewhere, None),
            Duration::from_millis(250)
        );
        // ...then the current step is waited, still without growing.
        assert_eq!(b.next_delay(Outcome::TryElsewhere, None), 4 * S);
        assert_eq!(b.next_delay(Outcome::TryElsewhere, None), 4 * S);
        assert_eq!(b.attempt(), 2);
        assert_eq!(
            b.consecutive_failures(),
            2,
            "a draining relay's refusal is not the agent's failure"
        );
        // Any other answer ends the streak.
        assert_eq!(b.next_delay(Outcome::Failed, None), 4 * S);
        assert_eq!(
            b.next_delay(Outcome::TryElsewhere, None),
            Duration::from_millis(250)
        );
    }
}
