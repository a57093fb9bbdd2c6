//! Host identifiers: the name a host agent registers its tunnel under.

use std::fmt;
use std::sync::Arc;

/// Longest hostId accepted.
pub const MAX_HOST_ID_LEN: usize = 128;

/// A validated hostId: 1 to 128 characters from `[A-Za-z0-9._-]`, with at most one `:`
/// between two non-empty parts (`<organizationId>:<machineId>`, the form superset's
/// hosts register with).
///
/// The character set keeps hostIds safe in URL paths (`:` is allowed in a path segment,
/// RFC 3986 §3.3), Redis keys (whose own separators are prefixes: the hostId is always
/// the key's tail), log lines and metric labels without any escaping. Cloning is cheap
/// (shared).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostId(Arc<str>);

/// Why a string is not a valid hostId. The caller (agent or client) is at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidHostId {
    /// The hostId is empty.
    #[error("hostId is empty")]
    Empty,
    /// The hostId is longer than [`MAX_HOST_ID_LEN`].
    #[error("hostId is longer than {MAX_HOST_ID_LEN} characters")]
    TooLong,
    /// The hostId has a character outside `[A-Za-z0-9._-]` (other than one `:`).
    #[error(
        "hostId may only contain A-Z, a-z, 0-9, '.', '_' and '-', and one ':' between two parts"
    )]
    BadCharacter,
    /// The hostId has more than one `:`, or one at either end.
    #[error("hostId may have one ':', between two non-empty parts (<org>:<machine>)")]
    BadSeparator,
}

impl HostId {
    /// Validates `s` as a hostId.
    ///
    /// ```
    /// use relay::host_id::HostId;
    /// assert!(HostId::parse("printer-7.lab_2").is_ok());
    /// assert!(HostId::parse("org_1:machine-7").is_ok());
    /// assert!(HostId::parse("a/b").is_err());
    /// assert!(HostId::parse("a:b:c").is_err());
    /// assert!(HostId::parse("").is_err());
    /// ```
    pub fn parse(s: &str) -> Result<HostId, InvalidHostId> {
        if s.is_empty() {
            return Err(InvalidHostId::Empty);
        }
        if s.len() > MAX_HOST_ID_LEN {
            return Err(InvalidHostId::TooLong);
        }
        let valid = |part: &str| {
            part.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'))
        };
        if !valid(s) {
            return Err(InvalidHostId::BadCharacter);
        }
        if let Some((org, machine)) = s.split_once(':')
            && (org.is_empty() || machine.is_empty() || machine.contains(':'))
        {
            return Err(InvalidHostId::BadSeparator);
        }
        Ok(HostId(Arc::from(s)))
    }

    /// A hostId as it stands in a URL path: as [`HostId::parse`], after decoding `%3A`,
    /// the one escape a client may write in a hostId (`encodeURIComponent("org:m")`).
    ///
    /// # Errors
    /// As [`HostId::parse`].
    pub fn from_path_segment(segment: &str) -> Result<HostId, InvalidHostId> {
        if !segment.contains('%') {
            return HostId::parse(segment);
        }
        HostId::parse(&segment.replace("%3A", ":").replace("%3a", ":"))
    }

    /// The organization of an `<org>:<machine>` hostId.
    pub fn org(&self) -> Option<&str> {
        self.0.split_once(':').map(|(org, _)| org)
    }

    /// The hostId as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_full_alphabet_up_to_128_chars() {
        assert!(HostId::parse("AZaz09._-").is_ok());
        assert!(HostId::parse(&"a".repeat(128)).is_ok());
        assert_eq!(HostId::parse(&"a".repeat(129)), Err(InvalidHostId::TooLong));
    }

    #[test]
    fn rejects_separators_encodings_and_non_ascii() {
        for bad in ["a b", "a/b", "a%41", "é", "a\nb", "*", "org:ma/chine"] {
            assert_eq!(
                HostId::parse(bad),
                Err(InvalidHostId::BadCharacter),
                "{bad}"
            );
        }
    }

    #[test]
    fn takes_one_colon_between_an_org_and_a_machine() {
        let host = HostId::parse("org_1:machine-7").unwrap();
        assert_eq!(host.org(), Some("org_1"));
        assert_eq!(HostId::parse("plain").unwrap().org(), None);
        for bad in [":", "a:", ":b", "a:b:c", "a::b"] {
            assert_eq!(
                HostId::parse(bad),
                Err(InvalidHostId::BadSeparator),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_path_segment_may_escape_the_colon() {
        for segment in ["org:m1", "org%3Am1", "org%3am1"] {
            assert_eq!(
                HostId::from_path_segment(segment).unwrap().as_str(),
                "org:m1"
            );
        }
        assert!(HostId::from_path_segment("org%2Fm1").is_err());
    }
}
