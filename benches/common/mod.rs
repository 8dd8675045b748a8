//! What every bench shares: the unit tests' deterministic values
//! (xorshift, in `[-scale, scale)`), so benches and tests describe the same
//! data and runs compare.

#[path = "../../src/test_values.rs"]
mod test_values;
pub(crate) use test_values::values;
