//! Sampling: one row of logits in, the next token out, with every request
//! parameter applied.
//!
//! The engine gives [`Sampler::sample`] the last position's logits for one
//! sequence. A [`Sampler`] belongs to one sequence: it owns that sequence's
//! random stream (so a `seed` reproduces one sequence whatever else shares the
//! batch) and the token counts its penalties need. The server checks
//! [`SamplingParams`] with [`SamplingParams::validate`] against the vocabulary
//! size; `sample` checks them again, cheaply, so a caller that skipped
//! validation gets an error rather than a panic.
//!
//! Order of operations (Hugging Face `transformers`' `_get_logits_processor`
//! and vLLM's sampler):
//! 1. `logit_bias` is added first, as OpenAI, llama.cpp and vLLM's logits
//!    processors do;
//! 2. `repetition_penalty` over every token seen in the prompt or the output
//!    (HF `RepetitionPenaltyLogitsProcessor`: positive logits divided, negative
//!    ones multiplied);
//! 3. `presence_penalty` and `frequency_penalty` over generated tokens only
//!    (OpenAI; vLLM applies them after the repetition penalty too);
//! 4. `temperature == 0` takes the argmax of that (lowest index on ties, as
//!    `torch.argmax`); otherwise logits are divided by the temperature;
//! 5. `top_k`, then `top_p` over the distribution renormalised on what top-k
//!    kept, then `min_p`: the order of HF's warpers. vLLM v1 applies min-p
//!    before top-k/top-p; the kept set differs only when both `min_p` and
//!    `top_p` are set, since min-p and top-k both keep a prefix of the sorted
//!    vocabulary and commute;
//! 6. a token is drawn from what is left, in proportion to its probability.
//!
//! Vocabularies reach 150k+ and this runs for every token, so:
//! - buffers live in the `Sampler` and are reused across calls;
//! - greedy is one vectorised pass for the maximum, then a search for its
//!   first index that stops there;
//! - `exp` is a vectorisable polynomial, not a library call per token;
//! - top-k streams the row through a small buffer cut back by partial
//!   selection (`select_nth_unstable_by`), before any `exp`;
//! - top-p drops tokens too unlikely ever to be kept, then sorts only as many
//!   of the rest as it needs;
//! - without top-k/top-p nothing is sorted: the draw walks the row.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, HashSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{Error, Result};

/// How far below `top_p` (in probability) a prefix's mass may fall and still
/// count as reaching it. Probabilities come from `f32` logits, so a prefix
/// whose true mass equals `top_p` exactly can sum to a few ulps less; without
/// this the boundary token's successor would be kept as well.
const TOP_P_TOLERANCE: f64 = 1e-6;

/// How many of the most likely tokens top-p sorts first. Most top-p sets are
/// far smaller than the vocabulary; when this is not enough, the next chunk is
/// four times larger.
const FIRST_TOP_P_CHUNK: usize = 64;

/// Everything a request can say about how to pick tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// Divides the logits; `0` means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `k` most likely tokens; `None` is off.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose mass reaches `top_p`;
    /// `1.0` is off.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the most likely
    /// token's; `0` is off.
    pub min_p: f32,
    /// HF / llama.cpp semantics over tokens seen in prompt and output: a
    /// positive logit is divided by it, a negative one multiplied; `1.0` is off.
    pub repetition_penalty: f32,
    /// OpenAI semantics over generated tokens: subtracted once from the logit
    /// of every token generated at least once.
    pub presence_penalty: f32,
    /// OpenAI semantics over generated tokens: subtracted from a token's logit
    /// once per time it was generated.
    pub frequency_penalty: f32,
    /// `(token id, bias)` added to the logits before anything else; entries
    /// for the same id add up.
    pub logit_bias: Vec<(u32, f32)>,
    /// Seeds the random stream; `None` seeds it from the operating system.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    /// Plain sampling from the model's distribution: temperature 1, every
    /// truncation and penalty off.
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: None,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Checks every field against its range, and `logit_bias` ids against the
    /// vocabulary. The message names the field, the limit and the value given.
    ///
    /// Every check is written so that NaN fails it (`contains` and `>` are
    /// false for NaN).
    pub fn validate(&self, vocab_size: usize) -> Result<()> {
        let t = self.temperature;
        if !(t.is_finite() && t >= 0.0) {
            return invalid(format!(
                "`temperature` must be a finite number >= 0. Given: {t}"
            ));
        }
        if let Some(k) = self.top_k {
            if k < 1 {
                return invalid(format!("`top_k` must be >= 1. Given: {k}"));
            }
        }
        let p = self.top_p;
        if !(p > 0.0 && p <= 1.0) {
            return invalid(format!("`top_p` must be in (0, 1]. Given: {p}"));
        }
        let m = self.min_p;
        if !(0.0..=1.0).contains(&m) {
            return invalid(format!("`min_p` must be in [0, 1]. Given: {m}"));
        }
        let r = self.repetition_penalty;
        if !(r.is_finite() && r > 0.0) {
            return invalid(format!(
                "`repetition_penalty` must be a finite number > 0. Given: {r}"
            ));
        }
        for (name, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&value) {
                return invalid(format!("`{name}` must be in [-2, 2]. Given: {value}"));
            }
        }
        for &(id, bias) in &self.logit_bias {
            if id as usize >= vocab_size {
                return invalid(format!(
                    "`logit_bias` token ids must be < {vocab_size} (the vocabulary size). Given: {id}"
                ));
            }
            if !(-100.0..=100.0).contains(&bias) {
                return invalid(format!(
                    "`logit_bias` values must be in [-100, 100]. Given: {bias} for token {id}"
                ));
            }
        }
        Ok(())
    }

    /// Whether `sample` takes the argmax instead of drawing.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// Whether a token mask allows token `id`: bit `id % 32` of word `id / 32`
/// (llguidance's and most GPU samplers' layout); ids past the mask are
/// refused.
pub fn mask_allows(mask: &[u32], id: u32) -> bool {
    mask.get(id as usize / 32)
        .is_some_and(|w| w & (1 << (id % 32)) != 0)
}

/// Sets every logit the mask refuses to `-inf`. Whole words of allowed
/// tokens (most of a mask inside a JSON string, say) are skipped.
pub fn apply_mask(logits: &mut [f32], mask: &[u32]) {
    for (w, chunk) in logits.chunks_mut(32).enumerate() {
        let word = mask.get(w).copied().unwrap_or(0);
        if word == u32::MAX {
            continue;
        }
        for (b, x) in chunk.iter_mut().enumerate() {
            if word & (1 << b) == 0 {
                *x = f32::NEG_INFINITY;
            }
        }
    }
}

fn invalid(message: String) -> Result<()> {
    Err(Error::InvalidRequest(message))
}

/// A token still in the running. `value` is its unnormalised probability
/// `exp(scaled logit)`, except inside top-k, which holds the scaled logit:
/// top-k only needs the order, which `exp` keeps, so it runs before any `exp`.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    id: u32,
    value: f32,
}

/// Most likely first; equal values by lowest id, so that the kept set and the
/// draw depend only on the logits and the seed, and top-k = 1 agrees with the
/// greedy argmax.
fn most_likely_first(a: &Candidate, b: &Candidate) -> Ordering {
    b.value.total_cmp(&a.value).then(a.id.cmp(&b.id))
}

/// Picks tokens for one sequence.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Tokens of the prompt and the output: the repetition penalty's domain.
    seen: HashSet<u32>,
    /// How often each token was generated: presence and frequency penalties.
    /// Sparse because a sequence sees a few thousand distinct tokens at most,
    /// while a dense vector would be walked in full every step.
    generated: HashMap<u32, u32>,
    /// The last call's logits after bias, penalties and temperature.
    processed: Vec<f32>,
    /// Scratch: `exp` of `processed` when no top-k keeps the row short.
    weights: Vec<f32>,
    /// Scratch for the tokens still in the running.
    candidates: Vec<Candidate>,
}

impl Sampler {
    /// A sampler for one sequence, its random stream seeded from
    /// `params.seed` or, without one, from the operating system.
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => entropy_rng(),
        };
        Sampler {
            params,
            rng,
            seen: HashSet::new(),
            generated: HashMap::new(),
            processed: Vec::new(),
            weights: Vec::new(),
            candidates: Vec::new(),
        }
    }

    /// The parameters this sampler applies.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Sees prompt tokens (for repetition penalty). Prompt tokens do not count
    /// towards the presence and frequency penalties, which OpenAI defines over
    /// the generated text.
    pub fn observe_prompt(&mut self, tokens: &[u32]) {
        self.seen.extend(tokens.iter().copied());
    }

    /// Picks the next token from `logits` (one row, `f32`, one entry per
    /// vocabulary token) and records it for later penalties. See the module
    /// header for the order in which parameters apply.
    ///
    /// Fails, without panicking, on empty logits, invalid parameters, a NaN or
    /// `+inf` logit (a numerical failure upstream), or logits that are all
    /// `-inf` after processing.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        let token = self.pick(logits, None)?;
        self.record(token);
        Ok(token)
    }

    /// Picks the next token as [`Sampler::sample`] does, among the tokens
    /// `mask` allows when there is one (see [`mask_allows`]), without
    /// recording it: a constrained sequence may throw the pick away (its
    /// grammar refuses it) and pick again with the grammar's mask, and only
    /// the token it keeps counts for the penalties ([`Sampler::record`]).
    ///
    /// The mask applies after bias and penalties, before temperature and
    /// truncation, so top-k/top-p/min-p choose among allowed tokens only.
    /// Fails when the mask leaves no token with a finite logit.
    pub fn pick(&mut self, logits: &[f32], mask: Option<&[u32]>) -> Result<u32> {
        self.process(logits)?;
        if let Some(mask) = mask {
            apply_mask(&mut self.processed, mask);
        }
        if self.params.is_greedy() {
            Ok(argmax(&self.processed)?.0 as u32)
        } else {
            let survivors = self.truncate()?;
            self.draw(survivors)
        }
    }

    /// Records a token the sequence keeps, for later penalties.
    pub fn record(&mut self, token: u32) {
        self.seen.insert(token);
        *self.generated.entry(token).or_insert(0) += 1;
    }

    /// The last `sample` call's logits after bias, penalties and temperature,
    /// before truncation: what [`Sampler::logprobs`] should be given. When
    /// sampling (temperature > 0) they are shifted so the largest is 0, which
    /// log-softmax ignores and which keeps a tiny temperature from overflowing.
    /// Greedy leaves them unscaled. Empty before the first call.
    pub fn processed_logits(&self) -> &[f32] {
        &self.processed
    }

    /// Log-softmax of `logits` (pass [`Sampler::processed_logits`]): the
    /// log-probability of `token` and the top `k` `(id, logprob)` pairs, most
    /// likely first, equal values by lowest id.
    ///
    /// NaN logits count as `-inf`. A `token` outside the row gets `-inf`. When
    /// the largest logit is not finite (every one `-inf` or NaN, or one
    /// `+inf`) there is no distribution to report: `(-inf, [])`.
    pub fn logprobs(logits: &[f32], token: u32, k: usize) -> (f32, Vec<(u32, f32)>) {
        let finite_or_neg_inf = |x: f32| if x.is_nan() { f32::NEG_INFINITY } else { x };
        let max = logits
            .iter()
            .map(|&x| finite_or_neg_inf(x))
            .fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return (f32::NEG_INFINITY, Vec::new());
        }
        // Summed in f64: 150k terms in f32 would lose the small ones. The
        // largest term is exactly 1, so the sum is at least 1.
        let mut lanes = [0.0_f64; 8];
        for (i, &x) in logits.iter().enumerate() {
            lanes[i % 8] += f64::from(exp_nonpositive(finite_or_neg_inf(x) - max));
        }
        let log_sum = lanes.iter().sum::<f64>().ln();
        let logprob = |x: f32| (f64::from(finite_or_neg_inf(x) - max) - log_sum) as f32;

        let chosen = logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |&x| logprob(x));

        // A heap of the k best so far: O(n log k) and k entries of memory,
        // where sorting the vocabulary would be O(n log n). `HeapEntry` puts
        // the least likely of those kept on top, ready to be replaced.
        let k = k.min(logits.len());
        let mut heap: BinaryHeap<HeapEntry> = BinaryHeap::with_capacity(k + 1);
        if k > 0 {
            for (i, &x) in logits.iter().enumerate() {
                if x.is_nan() {
                    continue;
                }
                let entry = HeapEntry(Candidate {
                    id: i as u32,
                    value: x,
                });
                if heap.len() < k {
                    heap.push(entry);
                } else if heap.peek().is_some_and(|worst| entry < *worst) {
                    heap.pop();
                    heap.push(entry);
                }
            }
        }
        let mut top: Vec<Candidate> = heap.into_iter().map(|e| e.0).collect();
        top.sort_unstable_by(most_likely_first);
        let top = top.into_iter().map(|c| (c.id, logprob(c.value))).collect();
        (chosen, top)
    }

    /// Copies `logits` into the scratch row and applies bias and penalties.
    fn process(&mut self, logits: &[f32]) -> Result<()> {
        if logits.is_empty() {
            return Err(Error::Sampling("the logits row is empty".into()));
        }
        self.params.validate(logits.len())?;
        self.processed.clear();
        self.processed.extend_from_slice(logits);
        let row = &mut self.processed;

        for &(id, bias) in &self.params.logit_bias {
            if let Some(x) = row.get_mut(id as usize) {
                *x += bias;
            }
        }

        let penalty = self.params.repetition_penalty;
        if penalty != 1.0 {
            for &id in &self.seen {
                // Ids beyond the row (a prompt token the model's head does not
                // cover) have no logit to penalise.
                if let Some(x) = row.get_mut(id as usize) {
                    *x = if *x > 0.0 { *x / penalty } else { *x * penalty };
                }
            }
        }

        let (presence, frequency) = (self.params.presence_penalty, self.params.frequency_penalty);
        if presence != 0.0 || frequency != 0.0 {
            for (&id, &count) in &self.generated {
                if let Some(x) = row.get_mut(id as usize) {
                    *x -= presence + frequency * count as f32;
                }
            }
        }
        Ok(())
    }

    /// Applies temperature, top-k, top-p and min-p, and says where the
    /// tokens still in the running are.
    fn truncate(&mut self) -> Result<Survivors> {
        let (_, max) = argmax(&self.processed)?;
        let temperature = self.params.temperature;
        let (top_p, min_p) = (self.params.top_p, self.params.min_p);
        let len = self.processed.len();
        let candidates = &mut self.candidates;
        candidates.clear();

        // Shift before dividing: `x / t` overflows for a tiny `t`, while
        // `(x - max) / t` is at most 0, and exactly 0 for the maximum, whose
        // weight `exp(0)` is then exactly 1.
        if let Some(k) = self.params.top_k.filter(|&k| k < len) {
            for x in self.processed.iter_mut() {
                *x = (*x - max) / temperature;
            }
            stream_top_k(&self.processed, k, candidates);
            for c in candidates.iter_mut() {
                c.value = exp_nonpositive(c.value);
            }
            if top_p < 1.0 {
                let total = candidates.iter().map(|c| f64::from(c.value)).sum();
                keep_top_p(candidates, top_p, total);
            }
        } else {
            // The whole row is exponentiated and its mass added up: all of
            // it for top-p; without top-p only min-p's survivors, since the
            // most likely token's weight is 1 and min-p's threshold `min_p`.
            let min_weight = if top_p < 1.0 { 0.0 } else { min_p };
            self.weights.resize(len, 0.0);
            for (x, w) in self.processed.iter_mut().zip(self.weights.iter_mut()) {
                *x = (*x - max) / temperature;
                *w = exp_nonpositive(*x);
            }
            let total = masked_sum(&self.weights, min_weight);
            if top_p >= 1.0 {
                // Nothing to sort: draw straight from the row.
                return Ok(Survivors::Row { min_weight, total });
            }
            // A kept token `j` has more than `1 - top_p` of the mass at or
            // below it, shared by at most `len` tokens none above `p_j`, so
            // `p_j > (1 - top_p) / len`. Only tokens above that floor (halved,
            // so rounding cannot cost a token) are worth sorting; for an LLM's
            // peaked distribution that drops nearly the whole vocabulary.
            let floor = (0.5 * (1.0 - f64::from(top_p)) * total / len as f64) as f32;
            for (i, &w) in self.weights.iter().enumerate() {
                if w > 0.0 && w >= floor {
                    candidates.push(Candidate {
                        id: i as u32,
                        value: w,
                    });
                }
            }
            keep_top_p(candidates, top_p, total);
        }

        if min_p > 0.0 {
            // min-p compares with the most likely token; renormalising after
            // top-k/top-p scales every probability alike, so the unnormalised
            // values compare the same way.
            let most = candidates.iter().map(|c| c.value).fold(0.0, f32::max);
            let threshold = min_p * most;
            candidates.retain(|c| c.value >= threshold);
        }
        Ok(Survivors::Candidates)
    }

    /// Draws one survivor in proportion to its weight.
    fn draw(&mut self, survivors: Survivors) -> Result<u32> {
        let u = self.rng.random::<f64>();
        let no_mass = || Error::Sampling("no token has a non-zero probability left".into());
        match survivors {
            Survivors::Row { min_weight, total } => {
                if total.is_nan() || total <= 0.0 {
                    return Err(no_mass());
                }
                pick_from_row(&self.weights, min_weight, u * total).ok_or_else(no_mass)
            }
            Survivors::Candidates => {
                let total: f64 = self.candidates.iter().map(|c| f64::from(c.value)).sum();
                if total.is_nan() || total <= 0.0 {
                    return Err(no_mass());
                }
                let tokens = self.candidates.iter().map(|c| (c.id, c.value));
                pick(tokens, u * total).ok_or_else(no_mass)
            }
        }
    }
}

/// Where the tokens still in the running are after [`Sampler::truncate`].
#[derive(Clone, Copy, Debug)]
enum Survivors {
    /// No top-k or top-p: the tokens of `Sampler::weights` weighing at least
    /// `min_weight`, whose weights sum to `total`.
    Row { min_weight: f32, total: f64 },
    /// `Sampler::candidates`, weights in `value`.
    Candidates,
}

/// Walks `(id, weight)` pairs, adding up weights, and returns the token at
/// which the sum passes `threshold`. Rounding can leave the sum a hair short
/// at the end; the last token with any weight is the right answer then.
/// Weightless tokens are never returned; `None` means there were none else.
fn pick(tokens: impl Iterator<Item = (u32, f32)>, threshold: f64) -> Option<u32> {
    let mut cumulative = 0.0;
    let mut last_possible = None;
    for (id, w) in tokens {
        if w > 0.0 {
            cumulative += f64::from(w);
            last_possible = Some(id);
            if cumulative > threshold {
                return Some(id);
            }
        }
    }
    last_possible
}

/// [`pick`] over the tokens of `weights` weighing at least `min_weight`, a
/// block at a time: a block's mass is a vectorised [`masked_sum`], and only
/// the block where the sum passes `threshold` is walked token by token. A
/// plain walk would be one long chain of dependent additions.
fn pick_from_row(weights: &[f32], min_weight: f32, threshold: f64) -> Option<u32> {
    const BLOCK: usize = 512;
    let mut cumulative = 0.0;
    for (b, block) in weights.chunks(BLOCK).enumerate() {
        let mass = masked_sum(block, min_weight);
        if cumulative + mass > threshold {
            let tokens = block
                .iter()
                .enumerate()
                .filter(|&(_, &w)| w >= min_weight)
                .map(|(i, &w)| ((b * BLOCK + i) as u32, w));
            return pick(tokens, threshold - cumulative);
        }
        cumulative += mass;
    }
    weights
        .iter()
        .rposition(|&w| w > 0.0 && w >= min_weight)
        .map(|i| i as u32)
}

/// Sum, in f64, of the weights of at least `min_weight`. Kept in independent
/// lanes so the compiler can vectorise it; one running sum could not be,
/// since reordering float additions changes the result.
fn masked_sum(weights: &[f32], min_weight: f32) -> f64 {
    const LANES: usize = 8;
    let mut lanes = [0.0_f64; LANES];
    let chunks = weights.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for j in 0..LANES {
            let w = chunk[j];
            lanes[j] += if w >= min_weight { f64::from(w) } else { 0.0 };
        }
    }
    let tail_sum: f64 = tail
        .iter()
        .filter(|&&w| w >= min_weight)
        .map(|&w| f64::from(w))
        .sum();
    lanes.iter().sum::<f64>() + tail_sum
}

/// `e^x` for the scaled logits, which are at most 0: the row's one costly
/// operation, `exp` on every token, in a form the compiler can vectorise,
/// where `f32::exp` is a library call per element. Cephes' `expf` method:
/// `x = n ln 2 + r` with `|r| <= ln 2 / 2`, a degree-7 polynomial for `e^r`,
/// and `2^n` built from its exponent bits; within a few ulps of `exp`.
/// Exactly 1 at 0, so the most likely token weighs 1; 0 at and below -87,
/// where `e^x` < 2^-125 is near the end of normal f32 and such a token's
/// chance against the most likely one's is nil. About 3x `f32::exp`.
#[inline]
fn exp_nonpositive(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that `n * LN2_HI` is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer
    // without `round()`, which is a library call on baseline x86-64.
    const ROUND: f32 = 12_582_912.0;
    // Plain selects rather than `f32::max` and an `as i32` cast, whose NaN
    // and saturation rules keep the loop from vectorising.
    let in_range = x > -87.0;
    let clamped = if in_range { x } else { -87.0 };
    let shifted = clamped * LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let poly =
        ((((((1.987_569_2e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
            + 0.166_666_65)
            * r
            + 0.5)
            * r
            * r)
            + r
            + 1.0;
    // `shifted` lies in [2^23, 2^24), where f32 steps by exactly 1, so its
    // bits minus those of `ROUND` are the integer `n`, in [-126, 0] here:
    // `n + 127` is then a valid biased exponent for `2^n`.
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let scale = f32::from_bits((n_bits.wrapping_add(127) as u32) << 23);
    if in_range {
        poly * scale
    } else {
        0.0
    }
}

/// Fills `out` with the `k` best of `row` (scaled logits) in
/// most-likely-first order, ties to the lowest id, without copying the whole
/// row: tokens go into a buffer of about `2k` only if they beat the current
/// k-th best, and a full buffer is cut back to `k` with a partial selection.
/// After the first few thousand tokens almost none beat the k-th best, so
/// this is one comparison per token. Needs `k < row.len()`.
fn stream_top_k(row: &[f32], k: usize, out: &mut Vec<Candidate>) {
    let limit = k.saturating_mul(2).max(k.saturating_add(256));
    out.reserve(limit.min(row.len()));
    // The k-th best value so far. A later token equal to it loses the tie
    // (higher id), hence the strict `>`; `-inf` tokens never enter.
    let mut kth = f32::NEG_INFINITY;
    for (i, &x) in row.iter().enumerate() {
        if x > kth {
            out.push(Candidate {
                id: i as u32,
                value: x,
            });
            if out.len() >= limit {
                out.select_nth_unstable_by(k - 1, most_likely_first);
                out.truncate(k);
                kth = out[k - 1].value;
            }
        }
    }
    if out.len() > k {
        out.select_nth_unstable_by(k - 1, most_likely_first);
        out.truncate(k);
    }
}

/// Truncates `candidates` (unnormalised probabilities, out of a mass of
/// `total`) to the smallest set of most likely tokens whose mass reaches
/// `top_p` of `total`, as HF's `TopPLogitsWarper`: a token is kept when the
/// mass strictly above it is below `top_p`. The first token is always kept.
///
/// Sorts a growing prefix instead of everything: select the best `chunk` of
/// what is not yet sorted, sort only those, and stop as soon as the mass is
/// reached.
fn keep_top_p(candidates: &mut Vec<Candidate>, top_p: f32, total: f64) {
    let target = (f64::from(top_p) - TOP_P_TOLERANCE) * total;
    let len = candidates.len();
    let mut cumulative = 0.0;
    let mut start = 0;
    let mut chunk = FIRST_TOP_P_CHUNK;
    while start < len {
        let end = start.saturating_add(chunk).min(len);
        if end < len {
            candidates[start..].select_nth_unstable_by(end - start - 1, most_likely_first);
        }
        candidates[start..end].sort_unstable_by(most_likely_first);
        for i in start..end {
            cumulative += f64::from(candidates[i].value);
            if cumulative >= target {
                candidates.truncate(i + 1);
                return;
            }
        }
        start = end;
        chunk = chunk.saturating_mul(4);
    }
}

/// Index and value of the largest logit, lowest index on ties (as
/// `torch.argmax`). Rejects NaN and `+inf` (signs of a numerical failure in
/// the model) and a row with nothing finite to pick.
///
/// A pass the compiler can vectorise (the maximum and whether any NaN is
/// present, kept per lane) then a block-wise search for the first index
/// holding the maximum, which stops there: on a 152k row about 4x faster than
/// one branchy pass carrying an index along, even when the maximum is last.
fn argmax(row: &[f32]) -> Result<(usize, f32)> {
    const LANES: usize = 16;
    let mut lane_max = [f32::NEG_INFINITY; LANES];
    let mut lane_nan = [false; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for j in 0..LANES {
            let x = chunk[j];
            // A NaN never wins `>`; `lane_nan` catches it instead.
            lane_max[j] = if x > lane_max[j] { x } else { lane_max[j] };
            lane_nan[j] |= x.is_nan();
        }
    }
    let mut max = f32::NEG_INFINITY;
    let mut nan = lane_nan.iter().any(|&n| n);
    for &x in lane_max.iter().chain(tail) {
        max = if x > max { x } else { max };
        nan |= x.is_nan();
    }

    if nan {
        let i = row.iter().position(|x| x.is_nan()).unwrap_or(0);
        return Err(Error::Sampling(format!("the logit of token {i} is NaN")));
    }
    if max == f32::INFINITY {
        let i = first_equal(row, max).unwrap_or(0);
        return Err(Error::Sampling(format!("the logit of token {i} is +inf")));
    }
    if max == f32::NEG_INFINITY {
        return Err(Error::Sampling(
            "every logit is -inf: no token can be chosen".into(),
        ));
    }
    Ok((first_equal(row, max).unwrap_or(0), max))
}

/// The first index of `row` holding `target`. Each block is tested whole,
/// without an early exit the compiler could not vectorise, and only the block
/// that has it is searched element by element.
fn first_equal(row: &[f32], target: f32) -> Option<usize> {
    const BLOCK: usize = 64;
    for (b, block) in row.chunks(BLOCK).enumerate() {
        if block.iter().fold(false, |hit, &x| hit | (x == target)) {
            return block
                .iter()
                .position(|&x| x == target)
                .map(|i| b * BLOCK + i);
        }
    }
    None
}

/// A random stream from the operating system; should that fail, from the
/// clock, since a request without a seed asks for variety, not secrecy.
fn entropy_rng() -> StdRng {
    StdRng::try_from_os_rng().unwrap_or_else(|_| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        StdRng::seed_from_u64(nanos)
    })
}

/// Orders a heap so that its top is the least likely entry: "greater" here
/// means "later in most-likely-first order".
struct HeapEntry(Candidate);

impl PartialEq for HeapEntry {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for HeapEntry {}

impl PartialOrd for HeapEntry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for HeapEntry {
    fn cmp(&self, other: &Self) -> Ordering {
        most_likely_first(&self.0, &other.0)
    }
}

#[cfg(test)]
mod tests {
    //! Each test checks against a reference written out plainly here, never
    //! against the helpers above.

    use super::*;

    fn with(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams {
            seed: Some(0),
            ..SamplingParams::default()
        };
        f(&mut p);
        p
    }

    fn greedy() -> SamplingParams {
        with(|p| p.temperature = 0.0)
    }

    fn random_logits(n: usize, seed: u64, spread: f32) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-spread..spread)).collect()
    }

    /// The ids that survive truncation, ascending.
    fn kept_ids(params: SamplingParams, logits: &[f32]) -> Result<Vec<u32>> {
        let mut sampler = Sampler::new(params);
        sampler.process(logits)?;
        let mut ids: Vec<u32> = match sampler.truncate()? {
            Survivors::Row { min_weight, .. } => (0..logits.len() as u32)
                .filter(|&i| {
                    let w = sampler.weights[i as usize];
                    w > 0.0 && w >= min_weight
                })
                .collect(),
            Survivors::Candidates => sampler
                .candidates
                .iter()
                .filter(|c| c.value > 0.0)
                .map(|c| c.id)
                .collect(),
        };
        ids.sort_unstable();
        Ok(ids)
    }

    /// softmax(logits / t) in f64, the slow obvious way.
    fn reference_softmax(logits: &[f32], t: f64) -> Vec<f64> {
        let scaled: Vec<f64> = logits.iter().map(|&x| f64::from(x) / t).collect();
        let max = scaled.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let exps: Vec<f64> = scaled.iter().map(|x| (x - max).exp()).collect();
        let sum: f64 = exps.iter().sum();
        exps.iter().map(|e| e / sum).collect()
    }

    /// Ids sorted by probability, most likely first, ties by lowest id.
    fn reference_order(probs: &[f64]) -> Vec<u32> {
        let mut ids: Vec<u32> = (0..probs.len() as u32).collect();
        ids.sort_by(|&a, &b| {
            probs[b as usize]
                .partial_cmp(&probs[a as usize])
                .unwrap_or(Ordering::Equal)
                .then(a.cmp(&b))
        });
        ids
    }

    /// Reference top-p: walk the sorted ids until the mass reaches `p`.
    fn reference_top_p(probs: &[f64], p: f64) -> Vec<u32> {
        let mut kept = Vec::new();
        let mut mass = 0.0;
        for id in reference_order(probs) {
            kept.push(id);
            mass += probs[id as usize];
            if mass >= p {
                break;
            }
        }
        kept.sort_unstable();
        kept
    }

    fn frequencies(sampler: &mut Sampler, logits: &[f32], draws: usize) -> Result<Vec<f64>> {
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..draws {
            counts[sampler.sample(logits)? as usize] += 1;
        }
        Ok(counts.iter().map(|&c| c as f64 / draws as f64).collect())
    }

    #[test]
    fn the_vectorisable_exp_matches_f64_exp() {
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-0.0), 1.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive(-1000.0), 0.0);
        let mut worst = 0.0_f64;
        let mut x = 0.0_f32;
        while x > -87.0 {
            let expected = f64::from(x).exp();
            let got = f64::from(exp_nonpositive(x));
            worst = worst.max(((got - expected) / expected).abs());
            x -= 0.000_731;
        }
        // f32 has 2^-24 = 6e-8 relative resolution; allow a few ulps.
        assert!(worst < 3e-7, "worst relative error {worst}");
    }

    #[test]
    fn greedy_picks_the_argmax() -> Result<()> {
        for (seed, n) in [(1, 10), (2, 1000), (3, 151_936)] {
            let logits = random_logits(n, seed, 20.0);
            let mut expected = 0;
            for i in 1..n {
                if logits[i] > logits[expected] {
                    expected = i;
                }
            }
            let mut sampler = Sampler::new(greedy());
            assert_eq!(sampler.sample(&logits)?, expected as u32);
        }
        Ok(())
    }

    #[test]
    fn greedy_ties_pick_the_lowest_index() -> Result<()> {
        let mut sampler = Sampler::new(greedy());
        assert_eq!(sampler.sample(&[1.0, 3.0, 3.0, 2.0, 3.0])?, 1);
        let ninf = f32::NEG_INFINITY;
        assert_eq!(sampler.sample(&[ninf, ninf, 0.5, 0.5])?, 2);
        Ok(())
    }

    #[test]
    fn top_k_one_equals_greedy_at_any_temperature() -> Result<()> {
        for seed in 0..5 {
            let mut logits = random_logits(3000, seed, 8.0);
            // A tie at the top: the lower index must win, as in greedy.
            let top = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            logits[2999] = top;
            let mut expected = 0;
            for (i, &x) in logits.iter().enumerate() {
                if x > logits[expected] {
                    expected = i;
                }
            }
            for t in [1e-30, 1e-3, 0.5, 1.0, 2.0, 1e3, 1e30] {
                let mut sampler = Sampler::new(with(|p| {
                    p.temperature = t;
                    p.top_k = Some(1);
                    p.seed = Some(seed);
                }));
                for _ in 0..20 {
                    assert_eq!(sampler.sample(&logits)?, expected as u32, "temperature {t}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn top_k_keeps_the_k_most_likely() -> Result<()> {
        let logits = random_logits(500, 7, 5.0);
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].partial_cmp(&logits[a]).unwrap_or(Ordering::Equal));
        let mut expected: Vec<u32> = order[..10].iter().map(|&i| i as u32).collect();
        expected.sort_unstable();

        let params = with(|p| p.top_k = Some(10));
        assert_eq!(kept_ids(params.clone(), &logits)?, expected);
        let mut sampler = Sampler::new(params);
        for _ in 0..2000 {
            assert!(expected.contains(&sampler.sample(&logits)?));
        }
        // A large vocabulary full of ties: the buffer is cut back many times,
        // and ties at the k-th place must go to the lowest ids.
        let mut rng = StdRng::seed_from_u64(8);
        let logits: Vec<f32> = (0..50_000)
            .map(|_| rng.random_range(0..40) as f32 * 0.25)
            .collect();
        for k in [1, 7, 300, 4000] {
            let mut order: Vec<usize> = (0..logits.len()).collect();
            // A stable sort keeps equal logits in id order.
            order.sort_by(|&a, &b| logits[b].partial_cmp(&logits[a]).unwrap_or(Ordering::Equal));
            let mut expected: Vec<u32> = order[..k].iter().map(|&i| i as u32).collect();
            expected.sort_unstable();
            assert_eq!(
                kept_ids(with(|p| p.top_k = Some(k)), &logits)?,
                expected,
                "k = {k}"
            );
        }
        let logits = random_logits(500, 7, 5.0);

        // k at or beyond the vocabulary keeps everything.
        let all: Vec<u32> = (0..500).collect();
        assert_eq!(kept_ids(with(|p| p.top_k = Some(500)), &logits)?, all);
        assert_eq!(kept_ids(with(|p| p.top_k = Some(10_000)), &logits)?, all);
        Ok(())
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() -> Result<()> {
        // Powers of two, so the reference sums are exact and the boundary
        // cases (p equal to a prefix's mass) are truly on the boundary.
        let probs = [0.0625, 0.5, 0.125, 0.25, 0.0625];
        let logits: Vec<f32> = probs.iter().map(|&p: &f64| p.ln() as f32).collect();
        let cases: [(f32, &[u32]); 10] = [
            (0.3, &[1]),
            (0.5, &[1]), // boundary: {1} has mass 0.5 exactly
            (0.6, &[1, 3]),
            (0.75, &[1, 3]), // boundary
            (0.8, &[1, 2, 3]),
            (0.875, &[1, 2, 3]),     // boundary
            (0.9, &[0, 1, 2, 3]),    // the tie at 0.0625 goes to the lower id
            (0.9375, &[0, 1, 2, 3]), // boundary
            (0.95, &[0, 1, 2, 3, 4]),
            (1.0, &[0, 1, 2, 3, 4]),
        ];
        for (p, expected) in cases {
            assert_eq!(
                reference_top_p(&probs, f64::from(p)),
                expected,
                "reference, p = {p}"
            );
            let kept = kept_ids(with(|s| s.top_p = p), &logits)?;
            assert_eq!(kept, expected, "top_p = {p}");
        }
        // Decimal probabilities: the prefix masses 0.7 and 0.9 are exact only
        // on paper, so these boundaries also test the rounding tolerance.
        let probs = [0.1_f64, 0.4, 0.2, 0.3];
        let logits_dec: Vec<f32> = probs.iter().map(|p| p.ln() as f32).collect();
        let cases: [(f32, &[u32]); 4] = [
            (0.7, &[1, 3]),
            (0.71, &[1, 2, 3]),
            (0.9, &[1, 2, 3]),
            (0.91, &[0, 1, 2, 3]),
        ];
        for (p, expected) in cases {
            let kept = kept_ids(with(|s| s.top_p = p), &logits_dec)?;
            assert_eq!(kept, expected, "top_p = {p}");
        }
        // Here the f32 prefix mass lands a few ulps below 0.75 (found by
        // search): without the tolerance, token 2 would be kept as well.
        let probs = [0.39_f64, 0.36, 0.125, 0.125];
        let logits_dec: Vec<f32> = probs.iter().map(|p| p.ln() as f32).collect();
        assert_eq!(kept_ids(with(|s| s.top_p = 0.75), &logits_dec)?, [0, 1]);
        assert_eq!(kept_ids(with(|s| s.top_p = 0.76), &logits_dec)?, [0, 1, 2]);

        // Draws never leave the kept set.
        let mut sampler = Sampler::new(with(|s| s.top_p = 0.75));
        for _ in 0..2000 {
            assert!([1, 3].contains(&sampler.sample(&logits)?));
        }
        Ok(())
    }

    #[test]
    fn top_p_over_a_large_vocabulary_matches_a_full_sort() -> Result<()> {
        // Thousands of tokens in the kept set, so the prefix grows past the
        // first chunks.
        let logits = random_logits(20_000, 11, 3.0);
        let probs = reference_softmax(&logits, 1.0);
        for p in [0.05_f32, 0.3, 0.9, 0.99] {
            let expected = reference_top_p(&probs, f64::from(p));
            let kept = kept_ids(with(|s| s.top_p = p), &logits)?;
            assert_eq!(kept.len(), expected.len(), "top_p = {p}");
            assert_eq!(kept, expected, "top_p = {p}");
        }

        // A peaked distribution, as an LLM's: a few likely tokens and a long
        // tail, most of which the floor drops before sorting.
        let mut peaked = random_logits(20_000, 12, 2.0);
        for (i, x) in peaked.iter_mut().enumerate().take(40) {
            *x += 12.0 - i as f32 * 0.2;
        }
        let peaked_probs = reference_softmax(&peaked, 1.0);
        for p in [0.5_f32, 0.9, 0.999] {
            let expected = reference_top_p(&peaked_probs, f64::from(p));
            let kept = kept_ids(with(|s| s.top_p = p), &peaked)?;
            // Deep in a tail of 20k tokens each holds less than 1e-6 of the
            // mass, so the rounding tolerance decides a few tokens: accept the
            // exact set for any p' in [p - 1e-6, p].
            let at_least = reference_top_p(&peaked_probs, f64::from(p) - 1e-6);
            let is_superset =
                |big: &[u32], small: &[u32]| small.iter().all(|i| big.binary_search(i).is_ok());
            assert!(
                is_superset(&kept, &at_least) && is_superset(&expected, &kept),
                "top_p = {p}: kept {}, expected between {} and {}",
                kept.len(),
                at_least.len(),
                expected.len()
            );
        }

        // With top-k first, top-p applies to the renormalised top-k mass.
        let order = reference_order(&probs);
        let top: Vec<u32> = order[..1000].to_vec();
        let top_mass: f64 = top.iter().map(|&i| probs[i as usize]).sum();
        let mut expected = Vec::new();
        let mut mass = 0.0;
        for &id in &top {
            expected.push(id);
            mass += probs[id as usize] / top_mass;
            if mass >= 0.9 {
                break;
            }
        }
        expected.sort_unstable();
        let kept = kept_ids(
            with(|s| {
                s.top_k = Some(1000);
                s.top_p = 0.9;
            }),
            &logits,
        )?;
        assert_eq!(kept, expected);
        Ok(())
    }

    #[test]
    fn min_p_drops_tokens_below_a_fraction_of_the_most_likely() -> Result<()> {
        let probs = [0.1, 0.4, 0.05, 0.3, 0.15];
        let logits: Vec<f32> = probs.iter().map(|&p: &f64| p.ln() as f32).collect();
        for min_p in [0.0_f32, 0.1, 0.2, 0.3, 0.5, 0.9, 1.0] {
            let max = probs.iter().cloned().fold(0.0, f64::max);
            let expected: Vec<u32> = (0..probs.len() as u32)
                .filter(|&i| probs[i as usize] >= f64::from(min_p) * max)
                .collect();
            // Thresholds land between the probabilities, never on one, except
            // min_p = 1 which keeps exactly the most likely.
            assert_eq!(
                kept_ids(with(|s| s.min_p = min_p), &logits)?,
                expected,
                "min_p = {min_p}"
            );
        }
        // After top-k or top-p, min-p still compares with the most likely.
        let after_top_k = with(|s| {
            s.top_k = Some(4);
            s.min_p = 0.3;
        });
        assert_eq!(kept_ids(after_top_k, &logits)?, [1, 3, 4]);
        let after_top_p = with(|s| {
            s.top_p = 0.9;
            s.min_p = 0.3;
        });
        assert_eq!(kept_ids(after_top_p, &logits)?, [1, 3, 4]);

        let mut sampler = Sampler::new(with(|s| s.min_p = 0.5));
        for _ in 0..2000 {
            assert!([1, 3].contains(&sampler.sample(&logits)?));
        }
        Ok(())
    }

    #[test]
    fn temperature_reshapes_the_empirical_distribution() -> Result<()> {
        let logits = [2.0_f32, 1.0, 0.5, 0.0, -1.0];
        let draws = 20_000;
        let mut top_share = Vec::new();
        for t in [0.5_f32, 1.0, 2.0] {
            let expected = reference_softmax(&logits, f64::from(t));
            let mut sampler = Sampler::new(with(|s| {
                s.temperature = t;
                s.seed = Some(1234);
            }));
            let observed = frequencies(&mut sampler, &logits, draws)?;
            for (i, (o, e)) in observed.iter().zip(&expected).enumerate() {
                // Four standard deviations of a frequency over 20k draws is at
                // most 0.0142.
                assert!((o - e).abs() < 0.015, "T = {t}, token {i}: {o} vs {e}");
            }
            top_share.push(observed[0]);
        }
        assert!(top_share[0] > top_share[1] && top_share[1] > top_share[2]);
        Ok(())
    }

    #[test]
    fn truncated_draws_follow_the_renormalised_distribution() -> Result<()> {
        let logits = [2.0_f32, 1.0, 0.5, 0.0, -1.0];
        let probs = reference_softmax(&logits, 1.0);
        let kept_mass: f64 = probs[..3].iter().sum();
        let mut sampler = Sampler::new(with(|s| s.top_k = Some(3)));
        let observed = frequencies(&mut sampler, &logits, 20_000)?;
        for i in 0..5 {
            let expected = if i < 3 { probs[i] / kept_mass } else { 0.0 };
            assert!((observed[i] - expected).abs() < 0.015, "token {i}");
        }
        Ok(())
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits() -> Result<()> {
        let logits = [2.0_f32, -2.0, 1.0, 3.0, 0.0, 0.5];
        let penalty = 2.0_f32;
        let mut sampler = Sampler::new(with(|s| {
            s.temperature = 0.0;
            s.repetition_penalty = penalty;
        }));
        sampler.observe_prompt(&[0, 1, 4, 0]);

        let penalise = |seen: &[usize]| -> Vec<f32> {
            let mut row = logits.to_vec();
            for &i in seen {
                row[i] = if row[i] > 0.0 {
                    row[i] / penalty
                } else {
                    row[i] * penalty
                };
            }
            row
        };
        assert_eq!(sampler.sample(&logits)?, 3);
        assert_eq!(sampler.processed_logits(), penalise(&[0, 1, 4]).as_slice());
        // The generated token is now seen too: 3.0 / 2 = 1.5 still wins.
        assert_eq!(sampler.sample(&logits)?, 3);
        assert_eq!(
            sampler.processed_logits(),
            penalise(&[0, 1, 3, 4]).as_slice()
        );
        Ok(())
    }

    #[test]
    fn presence_and_frequency_penalties_count_generated_tokens_only() -> Result<()> {
        let (presence, frequency) = (0.5_f32, 0.25_f32);
        let mut sampler = Sampler::new(with(|s| {
            s.temperature = 0.0;
            s.presence_penalty = presence;
            s.frequency_penalty = frequency;
        }));
        // Prompt tokens do not count for OpenAI's penalties.
        sampler.observe_prompt(&[2, 2, 2]);
        let one_hot = |id: usize| {
            let mut row = vec![0.0_f32; 5];
            row[id] = 10.0;
            row
        };
        assert_eq!(sampler.sample(&one_hot(1))?, 1);
        assert_eq!(sampler.sample(&one_hot(1))?, 1);
        assert_eq!(sampler.sample(&one_hot(0))?, 0);

        sampler.sample(&[0.0; 5])?;
        let counts = [1.0_f32, 2.0, 0.0, 0.0, 0.0];
        let expected: Vec<f32> = counts
            .iter()
            .map(|&c| {
                let present = if c > 0.0 { 1.0 } else { 0.0 };
                0.0 - (presence * present + frequency * c)
            })
            .collect();
        assert_eq!(sampler.processed_logits(), expected.as_slice());

        // Negative penalties encourage repeats.
        let mut sampler = Sampler::new(with(|s| {
            s.temperature = 0.0;
            s.presence_penalty = -1.0;
        }));
        assert_eq!(sampler.sample(&[0.0, 0.0, 0.5])?, 2);
        assert_eq!(sampler.sample(&[0.0, 0.9, 0.0])?, 2);
        Ok(())
    }

    #[test]
    fn logit_bias_minus_100_bans_and_plus_100_forces() -> Result<()> {
        let logits = random_logits(100, 5, 10.0);
        let mut best = 0;
        let mut worst = 0;
        for i in 0..logits.len() {
            if logits[i] > logits[best] {
                best = i;
            }
            if logits[i] < logits[worst] {
                worst = i;
            }
        }
        let banned = with(|s| s.logit_bias = vec![(best as u32, -100.0)]);
        assert_ne!(
            Sampler::new(with(|s| {
                *s = banned.clone();
                s.temperature = 0.0
            }))
            .sample(&logits)?,
            best as u32
        );
        let mut sampler = Sampler::new(banned);
        for _ in 0..5000 {
            assert_ne!(sampler.sample(&logits)?, best as u32);
        }

        let forced = with(|s| s.logit_bias = vec![(worst as u32, 100.0)]);
        assert_eq!(
            Sampler::new(with(|s| {
                *s = forced.clone();
                s.temperature = 0.0
            }))
            .sample(&logits)?,
            worst as u32
        );
        let mut sampler = Sampler::new(with(|s| {
            *s = forced;
            s.temperature = 2.0
        }));
        for _ in 0..5000 {
            assert_eq!(sampler.sample(&logits)?, worst as u32);
        }
        Ok(())
    }

    #[test]
    fn a_seed_reproduces_its_sequence_and_another_seed_does_not() -> Result<()> {
        let logits = random_logits(50, 9, 1.0);
        let run = |seed: u64| -> Result<Vec<u32>> {
            let mut sampler = Sampler::new(with(|s| {
                s.seed = Some(seed);
                s.top_p = 0.95;
                s.repetition_penalty = 1.1;
            }));
            (0..200).map(|_| sampler.sample(&logits)).collect()
        };
        assert_eq!(run(42)?, run(42)?);
        assert_ne!(run(42)?, run(43)?);
        Ok(())
    }

    #[test]
    fn validate_names_the_field_the_limit_and_the_value() {
        assert!(SamplingParams::default().validate(10).is_ok());
        assert!(greedy().validate(10).is_ok());
        let cases: Vec<(SamplingParams, &str)> = vec![
            (
                with(|s| s.temperature = -0.5),
                "`temperature` must be a finite number >= 0. Given: -0.5",
            ),
            (
                with(|s| s.temperature = f32::NAN),
                "`temperature` must be a finite number >= 0. Given: NaN",
            ),
            (
                with(|s| s.temperature = f32::INFINITY),
                "`temperature` must be a finite number >= 0. Given: inf",
            ),
            (
                with(|s| s.top_k = Some(0)),
                "`top_k` must be >= 1. Given: 0",
            ),
            (
                with(|s| s.top_p = 1.5),
                "`top_p` must be in (0, 1]. Given: 1.5",
            ),
            (
                with(|s| s.top_p = 0.0),
                "`top_p` must be in (0, 1]. Given: 0",
            ),
            (
                with(|s| s.top_p = f32::NAN),
                "`top_p` must be in (0, 1]. Given: NaN",
            ),
            (
                with(|s| s.min_p = -0.1),
                "`min_p` must be in [0, 1]. Given: -0.1",
            ),
            (
                with(|s| s.min_p = 1.1),
                "`min_p` must be in [0, 1]. Given: 1.1",
            ),
            (
                with(|s| s.repetition_penalty = 0.0),
                "`repetition_penalty` must be a finite number > 0. Given: 0",
            ),
            (
                with(|s| s.presence_penalty = 2.5),
                "`presence_penalty` must be in [-2, 2]. Given: 2.5",
            ),
            (
                with(|s| s.frequency_penalty = -3.0),
                "`frequency_penalty` must be in [-2, 2]. Given: -3",
            ),
            (
                with(|s| s.logit_bias = vec![(3, 1.0), (10, 1.0)]),
                "`logit_bias` token ids must be < 10 (the vocabulary size). Given: 10",
            ),
            (
                with(|s| s.logit_bias = vec![(3, -101.0)]),
                "`logit_bias` values must be in [-100, 100]. Given: -101 for token 3",
            ),
        ];
        for (params, message) in cases {
            match params.validate(10) {
                Err(Error::InvalidRequest(m)) => assert_eq!(m, message),
                other => panic!("{params:?} gave {other:?}, expected {message:?}"),
            }
        }
        // The limits themselves are allowed.
        let edges = with(|s| {
            s.temperature = 0.0;
            s.top_k = Some(1);
            s.top_p = 1.0;
            s.min_p = 1.0;
            s.presence_penalty = -2.0;
            s.frequency_penalty = 2.0;
            s.logit_bias = vec![(9, 100.0), (0, -100.0)];
        });
        assert!(edges.validate(10).is_ok());
    }

    #[test]
    fn sample_rejects_parameters_that_skipped_validation() {
        for params in [
            with(|s| s.top_k = Some(0)),
            with(|s| s.temperature = -1.0),
            with(|s| s.logit_bias = vec![(7, 1.0)]),
        ] {
            let result = Sampler::new(params).sample(&[0.0, 1.0, 2.0]);
            assert!(
                matches!(result, Err(Error::InvalidRequest(_))),
                "{result:?}"
            );
        }
    }

    #[test]
    fn bad_logits_give_an_error_not_a_panic() -> Result<()> {
        let ninf = f32::NEG_INFINITY;
        let rows: [&[f32]; 7] = [
            &[f32::NAN, 1.0, 2.0],
            &[1.0, f32::NAN, 2.0],
            &[1.0, 2.0, f32::NAN],
            &[f32::NAN; 3],
            &[1.0, f32::INFINITY, 2.0],
            &[ninf, ninf],
            &[],
        ];
        for params in [
            greedy(),
            SamplingParams::default(),
            with(|s| {
                s.top_k = Some(2);
                s.top_p = 0.5;
                s.min_p = 0.1;
                s.repetition_penalty = 1.3;
            }),
        ] {
            let mut sampler = Sampler::new(params);
            sampler.observe_prompt(&[0, 1, 99]);
            for row in rows {
                let result = sampler.sample(row);
                assert!(
                    matches!(result, Err(Error::Sampling(_))),
                    "{row:?}: {result:?}"
                );
            }
            // The sampler is still usable afterwards.
            assert_eq!(sampler.sample(&[ninf, 5.0, ninf])?, 1);
        }
        Ok(())
    }

    #[test]
    fn logprobs_are_the_log_softmax_with_the_top_k_sorted() {
        let logits = [1.0_f32, 3.0, -2.0, 3.0, 0.5, f32::NEG_INFINITY];
        let sum: f64 = logits.iter().map(|&x| f64::from(x).exp()).sum();
        let expected: Vec<f32> = logits
            .iter()
            .map(|&x| (f64::from(x) - sum.ln()) as f32)
            .collect();

        let (chosen, top) = Sampler::logprobs(&logits, 4, 3);
        assert!((chosen - expected[4]).abs() < 1e-6);
        let ids: Vec<u32> = top.iter().map(|&(id, _)| id).collect();
        assert_eq!(ids, [1, 3, 0]); // the 3.0 tie goes to the lower id first
        for (id, lp) in top {
            assert!((lp - expected[id as usize]).abs() < 1e-6);
        }

        let (_, all) = Sampler::logprobs(&logits, 0, 100);
        assert_eq!(all.len(), logits.len());
        assert_eq!(
            all.last().map(|&(id, lp)| (id, lp)),
            Some((5, f32::NEG_INFINITY))
        );
        assert!(Sampler::logprobs(&logits, 0, 0).1.is_empty());
        assert_eq!(Sampler::logprobs(&logits, 6, 1).0, f32::NEG_INFINITY);

        // NaN counts as -inf; nothing finite means no distribution.
        let (lp, top) = Sampler::logprobs(&[f32::NAN, 0.0], 0, 2);
        assert_eq!(lp, f32::NEG_INFINITY);
        assert_eq!(top, [(1, 0.0)]);
        assert_eq!(
            Sampler::logprobs(&[f32::NAN; 2], 0, 2),
            (f32::NEG_INFINITY, Vec::new())
        );
    }

    #[test]
    fn processed_logits_carry_bias_penalties_and_temperature() -> Result<()> {
        let logits = [1.0_f32, 2.0, 0.0, -1.0];
        let t = 2.0_f32;
        let mut sampler = Sampler::new(with(|s| {
            s.temperature = t;
            s.top_k = Some(1); // truncation must not show in the logprobs
            s.logit_bias = vec![(2, 1.5)];
        }));
        let token = sampler.sample(&logits)?;
        assert_eq!(token, 1);
        let biased = [1.0_f32, 2.0, 1.5, -1.0];
        let expected = reference_softmax(&biased, f64::from(t));
        let (chosen, top) = Sampler::logprobs(sampler.processed_logits(), token, 4);
        assert!((f64::from(chosen) - expected[1].ln()).abs() < 1e-6);
        for (id, lp) in top {
            assert!(
                (f64::from(lp) - expected[id as usize].ln()).abs() < 1e-6,
                "token {id}"
            );
        }
        Ok(())
    }

    #[test]
    fn a_mask_limits_every_kind_of_pick_to_allowed_tokens() -> Result<()> {
        let logits = random_logits(100, 11, 3.0);
        // Tokens 3, 40 and 77 (bits in words 0, 1 and 2).
        let mut mask = vec![0u32; 4];
        for t in [3u32, 40, 77] {
            mask[t as usize / 32] |= 1 << (t % 32);
        }
        assert!(mask_allows(&mask, 40) && !mask_allows(&mask, 41) && !mask_allows(&mask, 500));
        let best = [3usize, 40, 77]
            .into_iter()
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
            .expect("three");
        let mut sampler = Sampler::new(greedy());
        assert_eq!(sampler.pick(&logits, Some(&mask))?, best as u32);
        for params in [
            SamplingParams::default(),
            with(|s| {
                s.top_k = Some(2);
                s.top_p = 0.5;
            }),
            with(|s| s.min_p = 0.2),
        ] {
            let mut sampler = Sampler::new(params);
            for _ in 0..500 {
                let t = sampler.pick(&logits, Some(&mask))?;
                assert!([3, 40, 77].contains(&t), "{t}");
            }
        }
        // Nothing allowed is an error, not a panic.
        assert!(sampler.pick(&logits, Some(&[0u32; 4])).is_err());
        // `pick` does not count the token for the penalties; `record` does.
        let mut sampler = Sampler::new(with(|s| {
            s.temperature = 0.0;
            s.presence_penalty = 2.0;
        }));
        let first = sampler.pick(&logits, None)?;
        assert_eq!(sampler.pick(&logits, None)?, first);
        sampler.record(first);
        sampler.pick(&logits, None)?;
        let top = argmax(&logits)?.1;
        assert_eq!(sampler.processed_logits()[first as usize], top - 2.0);
        Ok(())
    }
}
