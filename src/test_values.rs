//! Deterministic test inputs shared by the unit tests and (included by
//! path) the benches.

/// `n` values in `[-scale, scale)` from an xorshift generator seeded with
/// `seed`.
pub(crate) fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}
