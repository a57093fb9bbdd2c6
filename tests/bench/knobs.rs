//! Benchmark knobs read from the environment: an unset or empty variable means "the
//! default"; a value that does not parse is an error naming the variable.

use anyhow::{Context, Result, bail};

/// A whole number.
///
/// # Errors
/// When the value is not a whole number.
pub fn env_u64(name: &str) -> Result<Option<u64>> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .map(Some)
            .with_context(|| format!("{name}={v:?} is not a whole number")),
        _ => Ok(None),
    }
}

/// A comma-separated list of whole numbers.
///
/// # Errors
/// When an item is not a whole number.
pub fn env_list(name: &str) -> Result<Option<Vec<usize>>> {
    match std::env::var(name) {
        Ok(list) if !list.trim().is_empty() => list
            .split(',')
            .map(|n| n.trim().parse::<usize>())
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
            .with_context(|| format!("{name}={list:?} is not a list of numbers")),
        _ => Ok(None),
    }
}

/// A comma-separated list of words, each one of `allowed`.
///
/// # Errors
/// When a word is not allowed.
pub fn env_words(name: &str, allowed: &[&str]) -> Result<Option<Vec<String>>> {
    let Ok(list) = std::env::var(name) else {
        return Ok(None);
    };
    if list.trim().is_empty() {
        return Ok(None);
    }
    let words: Vec<String> = list.split(',').map(|w| w.trim().to_owned()).collect();
    if let Some(bad) = words.iter().find(|w| !allowed.contains(&w.as_str())) {
        bail!(
            "{name}={list:?}: {bad:?} is not one of {}",
            allowed.join(", ")
        );
    }
    Ok(Some(words))
}

/// A size in bytes: a whole number with an optional binary suffix `K`, `M` or `G`
/// (`8M` is 8 MiB).
///
/// # Errors
/// When the value is not such a size.
pub fn env_bytes(name: &str) -> Result<Option<u64>> {
    let Ok(v) = std::env::var(name) else {
        return Ok(None);
    };
    let v = v.trim();
    if v.is_empty() {
        return Ok(None);
    }
    let (digits, shift) = match v.as_bytes()[v.len() - 1].to_ascii_uppercase() {
        b'K' => (&v[..v.len() - 1], 10),
        b'M' => (&v[..v.len() - 1], 20),
        b'G' => (&v[..v.len() - 1], 30),
        _ => (v, 0),
    };
    let n: u64 = digits
        .trim()
        .parse()
        .with_context(|| format!("{name}={v:?} is not a size (a number, or with K, M or G)"))?;
    n.checked_mul(1 << shift)
        .map(Some)
        .with_context(|| format!("{name}={v:?} is too large"))
}
