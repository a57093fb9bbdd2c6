//! Host identifiers: the name a host agent registers its tunnel under.

use std::fmt;
use std::sync::Arc;

/// Longest hostId accepted.
pub const MAX_HOST_ID_LEN: usize = 128;

/// A validated hostId: 1 to 128 characters from `[A-Za-z0-9._-]`.
///
/// The character set keeps hostIds safe in URL paths, Redis keys, log lines and metric
/// labels without any escaping. Cloning is cheap (shared).
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
    /// The hostId has a character outside `[A-Za-z0-9._-]`.
    #[error("hostId may only contain A-Z, a-z, 0-9, '.', '_' and '-'")]
    BadCharacter,
}

impl HostId {
    /// Validates `s` as a hostId.
    ///
    /// ```
    /// use relay::host_id::HostId;
    /// assert!(HostId::parse("printer-7.lab_2").is_ok());
    /// assert!(HostId::parse("a/b").is_err());
    /// assert!(HostId::parse("").is_err());
    /// ```
    pub fn parse(s: &str) -> Result<HostId, InvalidHostId> {
        if s.is_empty() {
            return Err(InvalidHostId::Empty);
        }
        if s.len() > MAX_HOST_ID_LEN {
            return Err(InvalidHostId::TooLong);
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(InvalidHostId::BadCharacter);
        }
        Ok(HostId(Arc::from(s)))
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
        for bad in ["a b", "a/b", "a:b", "a%41", "é", "a\nb", "*"] {
            assert_eq!(
                HostId::parse(bad),
                Err(InvalidHostId::BadCharacter),
                "{bad}"
            );
        }
    }
}
