//! `Retry-After` (RFC 9110 §10.2.3), as a relay sends it with 429 or 503 on the upgrade.
//!
//! Both forms are understood: delay-seconds (`120`) and an HTTP-date
//! (`Fri, 31 Dec 1999 23:59:59 GMT`, plus the obsolete forms `httpdate` accepts). A date
//! in the past means "now"; a value that is neither form is unusable and also counts as
//! zero, so the agent falls back to its own backoff. Every delay is clamped, so a typo on
//! the relay cannot park a fleet of agents for days.

use std::time::{Duration, SystemTime};

/// Parses a `Retry-After` value against the wall clock `now`, clamped at `max`.
/// `None` when the value is neither delay-seconds nor an HTTP-date.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use relay::agent::retry_after::parse;
/// let max = Duration::from_secs(3600);
/// assert_eq!(parse("120", SystemTime::now(), max), Some(Duration::from_secs(120)));
/// assert_eq!(parse("soon", SystemTime::now(), max), None);
/// ```
pub fn parse(value: &str, now: SystemTime, max: Duration) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Too many digits for a u64 is still a (very long) delay: clamp it.
        let secs = value.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(secs).min(max));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO).min(max))
}

/// The delay a `Retry-After` header asks for: zero when it is absent or unusable.
pub fn delay(value: Option<&str>, now: SystemTime, max: Duration) -> Duration {
    value
        .and_then(|v| parse(v, now, max))
        .unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn now() -> SystemTime {
        // 2024-01-01T00:00:00Z, fixed so dates are exact.
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_704_067_200)
    }

    #[test]
    fn delay_seconds() {
        assert_eq!(parse("0", now(), HOUR), Some(Duration::ZERO));
        assert_eq!(parse("30", now(), HOUR), Some(Duration::from_secs(30)));
        assert_eq!(parse(" 7 ", now(), HOUR), Some(Duration::from_secs(7)));
    }

    #[test]
    fn http_date_in_the_future() {
        let at = httpdate::fmt_http_date(now() + Duration::from_secs(90));
        assert_eq!(at, "Mon, 01 Jan 2024 00:01:30 GMT");
        assert_eq!(parse(&at, now(), HOUR), Some(Duration::from_secs(90)));
        // The obsolete RFC 850 and asctime forms are still HTTP-dates.
        assert_eq!(
            parse("Monday, 01-Jan-24 00:02:00 GMT", now(), HOUR),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse("Mon Jan  1 00:00:05 2024", now(), HOUR),
            Some(Duration::from_secs(5))
        );
    }

    #[test]
    fn past_date_is_zero() {
        assert_eq!(
            parse("Sun, 31 Dec 2023 23:00:00 GMT", now(), HOUR),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn malformed_is_zero() {
        for bad in ["", "soon", "-5", "1.5", "30s", "0x10", "Mon, 99 Foo 2024"] {
            assert_eq!(parse(bad, now(), HOUR), None, "{bad:?}");
            assert_eq!(delay(Some(bad), now(), HOUR), Duration::ZERO, "{bad:?}");
        }
        assert_eq!(delay(None, now(), HOUR), Duration::ZERO);
    }

    #[test]
    fn huge_values_are_clamped() {
        assert_eq!(parse("86400", now(), HOUR), Some(HOUR));
        assert_eq!(parse("99999999999999999999999999", now(), HOUR), Some(HOUR));
        assert_eq!(
            parse("Fri, 01 Jan 2100 00:00:00 GMT", now(), HOUR),
            Some(HOUR)
        );
        assert_eq!(
            delay(Some("7200"), now(), Duration::from_secs(60)),
            Duration::from_secs(60)
        );
    }
}
