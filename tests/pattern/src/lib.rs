//! The deterministic pseudo-random byte stream that relay's bulk-transfer
//! tests send, receive and check.
//!
//! A crate of its own for one reason: the workspace's `Cargo.toml` compiles it
//! with `opt-level = 3` even in the `dev` profile. Unoptimized, generating
//! bytes runs at under 100 MB/s and would be the bottleneck of every
//! streaming test; optimized it runs at several GB/s, far beyond loopback TCP.
//! The test support library (`relay-tests`) re-exports it as
//! `relay_tests::bulk::Pattern`.

/// A deterministic stream of pseudo-random bytes: the little-endian bytes of
/// successive SplitMix64 outputs seeded with `seed`.
///
/// Byte `i` of the stream depends only on `seed` and `i`, never on how the
/// stream is cut into [`fill`](Pattern::fill) calls, so a server and a client
/// produce the same bytes whatever their chunk sizes.
///
/// ```
/// use relay_test_pattern::Pattern;
///
/// let mut whole = [0u8; 20];
/// Pattern::new(7).fill(&mut whole);
/// let mut pattern = Pattern::new(7);
/// let (mut a, mut b) = ([0u8; 3], [0u8; 17]);
/// pattern.fill(&mut a);
/// pattern.fill(&mut b);
/// assert_eq!([&a[..], &b[..]].concat(), whole);
/// ```
#[derive(Debug, Clone)]
pub struct Pattern {
    /// SplitMix64 state.
    state: u64,
    /// The bytes of the last output not handed out yet are its last
    /// `spare_len` bytes.
    spare: [u8; 8],
    spare_len: usize,
}

// === impl Pattern ===

impl Pattern {
    /// The stream for `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed,
            spare: [0; 8],
            spare_len: 0,
        }
    }

    /// The next SplitMix64 output (Steele, Lea and Flood's constants).
    #[inline]
    fn next_word(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Fills `buf` with the next `buf.len()` bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        // First what is left of the previous word.
        let take = self.spare_len.min(buf.len());
        let from = 8 - self.spare_len;
        buf[..take].copy_from_slice(&self.spare[from..from + take]);
        self.spare_len -= take;
        let buf = &mut buf[take..];

        let mut words = buf.chunks_exact_mut(8);
        for word in &mut words {
            word.copy_from_slice(&self.next_word().to_le_bytes());
        }
        let tail = words.into_remainder();
        if !tail.is_empty() {
            self.spare = self.next_word().to_le_bytes();
            tail.copy_from_slice(&self.spare[..tail.len()]);
            self.spare_len = 8 - tail.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(pattern: &mut Pattern, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        pattern.fill(&mut buf);
        buf
    }

    #[test]
    fn the_stream_is_splitmix64_little_endian() {
        // SplitMix64's first output for seed 0 is the published 0xE220A8397B1DCDAF.
        assert_eq!(
            bytes(&mut Pattern::new(0), 8),
            0xE220_A839_7B1D_CDAFu64.to_le_bytes()
        );
        assert_ne!(
            bytes(&mut Pattern::new(1), 64),
            bytes(&mut Pattern::new(2), 64)
        );
    }

    /// `cargo test -p relay-test-pattern -- --nocapture` prints the rate.
    /// The floor is far below it (several GB/s) but above the unoptimized
    /// rate (under 100 MB/s), so losing the workspace's `opt-level`
    /// override for this crate fails.
    #[test]
    fn the_stream_is_generated_fast() {
        const TOTAL: usize = 1 << 30;
        let mut buf = vec![0u8; 64 * 1024];
        let mut pattern = Pattern::new(1);
        let started = std::time::Instant::now();
        for _ in 0..TOTAL / buf.len() {
            pattern.fill(&mut buf);
            std::hint::black_box(&buf);
        }
        let rate = TOTAL as f64 / started.elapsed().as_secs_f64();
        eprintln!("pattern generator: {:.0} MB/s", rate / 1e6);
        assert!(rate > 300e6, "{:.0} MB/s", rate / 1e6);
    }

    #[test]
    fn the_stream_does_not_depend_on_how_it_is_cut() {
        let whole = bytes(&mut Pattern::new(42), 10_000);
        for cut in [1, 3, 7, 8, 9, 64, 1000, 4095] {
            let mut pattern = Pattern::new(42);
            let mut pieces = Vec::new();
            while pieces.len() < whole.len() {
                let len = cut.min(whole.len() - pieces.len());
                pieces.extend_from_slice(&bytes(&mut pattern, len));
            }
            assert_eq!(pieces, whole, "cut into {cut}-byte pieces");
        }
    }
}
