//! A small deterministic generator (SplitMix64): the same seed gives the
//! same inputs on every machine, so a run can be repeated with `--seed`.

/// SplitMix64 (Steele, Lea and Flood): one 64-bit state, a full period,
/// good enough to drive mutations.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            ((self.next_u64() as u128 * n as u128) >> 64) as usize
        }
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    /// True once in `n` times.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    /// A length in `1..=max`, small ones more likely: log-uniform, so that
    /// runs of one word and runs of the whole file both come up.
    pub fn len_upto(&mut self, max: usize) -> usize {
        if max <= 1 {
            return max;
        }
        let bits = usize::BITS - max.leading_zeros();
        let b = self.range(0, bits as usize);
        let cap = if b >= usize::BITS as usize { max } else { (1usize << b).min(max) };
        self.range(1, cap)
    }

    /// One element of a non-empty slice.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}
