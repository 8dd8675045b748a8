//! Mixture-of-experts feed-forward layers (Mixtral, Qwen3-MoE).
//!
//! A linear router scores every expert for every token; each token goes
//! through its `top_k` best experts, and its output is their outputs
//! weighted by the router's softmax probabilities (renormalised over the
//! chosen ones when the config says so). Upstream: `MixtralSparseMoeBlock`
//! in `transformers/models/mixtral/modeling_mixtral.py` and
//! `Qwen3MoeSparseMoeBlock` in `.../qwen3_moe/modeling_qwen3_moe.py`.
//!
//! Tokens are grouped by expert: each expert runs once per pass over all
//! the tokens of the batch that chose it, so its weights are read once per
//! step however many sequences route to it (on a CPU that read is the
//! cost). A token's output adds its experts' contributions in ascending
//! expert order, whatever else is in the batch, so its bits do not depend
//! on the batch (issue 11).

use candle_core::{DType, Device, Tensor};

use crate::config::Activation;
use crate::models::layers::{Linear, Mlp};
use crate::quant::QMatrix;
use crate::{Error, Result};

/// One expert layer: the router and the experts' MLPs.
#[derive(Debug, Clone)]
pub struct MoeBlock {
    /// `[num_experts, hidden]`: a score per expert for each token.
    pub router: Linear,
    pub experts: Vec<Mlp>,
    pub top_k: usize,
    pub norm_topk_prob: bool,
}

/// Which tokens of a pass went to one expert, and with what weight.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Routed {
    pub tokens: Vec<u32>,
    pub weights: Vec<f32>,
}

impl MoeBlock {
    /// Every projection of the block (for counting parameters and bytes).
    pub fn linears(&self) -> impl Iterator<Item = &Linear> {
        std::iter::once(&self.router)
            .chain(self.experts.iter().flat_map(|e| [&e.gate, &e.up, &e.down]))
    }

    /// `x` is `[tokens, hidden]`; returns the same shape in `x`'s dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let scores = self
            .router
            .forward(x)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        // With libm's `exp` rather than `cpu_ops`' faster one (2e-6
        // relative): the routing weights scale whole expert outputs, and a
        // few experts per token make this cheap.
        let probs: Vec<Vec<f32>> = scores.iter().map(|s| softmax(s)).collect();
        let routes = route(&probs, self.experts.len(), self.top_k, self.norm_topk_prob)?;
        if let Some(out) = self.forward_grouped(x, &routes)? {
            return Ok(out);
        }
        self.forward_by_expert(x, &routes)
    }

    /// One expert at a time (three products each).
    fn forward_by_expert(&self, x: &Tensor, routes: &[Routed]) -> Result<Tensor> {
        let (tokens, hidden) = x.dims2()?;
        let mut out = vec![0f32; tokens * hidden];
        for (expert, r) in self.experts.iter().zip(routes) {
            if r.tokens.is_empty() {
                continue;
            }
            let n = r.tokens.len();
            let idx = Tensor::from_vec(r.tokens.clone(), n, x.device())?;
            let y = expert
                .forward(&x.index_select(&idx, 0)?)?
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()?;
            for ((&t, &w), row) in r.tokens.iter().zip(&r.weights).zip(&y) {
                let o = &mut out[t as usize * hidden..(t as usize + 1) * hidden];
                for (o, v) in o.iter_mut().zip(row) {
                    *o += v * w;
                }
            }
        }
        let out = Tensor::from_vec(out, (tokens, hidden), &Device::Cpu)?;
        Ok(out.to_device(x.device())?.to_dtype(x.dtype())?)
    }
}

/// `exp(s - max) / Σ exp(s - max)`, in f32 as `torch.softmax` computes it.
impl MoeBlock {
    /// The experts of a quantized SiLU block in two parallel passes over
    /// all of them (gate and up of every routed expert, then every down)
    /// instead of three per expert: with 8 of 128 experts routed, a decode
    /// step synchronises the pool twice a layer rather than 24 times, and a
    /// batch's tokens still meet each expert's weights once. `None` when the
    /// block is not of that kind (dense or biased experts, another
    /// activation, a GPU): [`Self::forward`] runs expert by expert then.
    fn forward_grouped(&self, x: &Tensor, routes: &[Routed]) -> Result<Option<Tensor>> {
        if !x.device().is_cpu() || self.experts.iter().any(|e| e.activation != Activation::Silu) {
            return Ok(None);
        }
        let active: Vec<usize> = (0..routes.len())
            .filter(|&e| !routes[e].tokens.is_empty())
            .collect();
        let mut gate_up = Vec::with_capacity(2 * active.len());
        let mut down = Vec::with_capacity(active.len());
        for &e in &active {
            let ex = &self.experts[e];
            match (
                ex.gate.quantized_unbiased(),
                ex.up.quantized_unbiased(),
                ex.down.quantized_unbiased(),
            ) {
                (Some(g), Some(u), Some(d)) => {
                    gate_up.extend([g, u]);
                    down.push(d);
                }
                _ => return Ok(None),
            }
        }
        let (tokens, hidden) = x.dims2()?;
        let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        // Each routed expert's tokens, gathered.
        let gathered: Vec<Vec<f32>> = active
            .iter()
            .map(|&e| {
                let mut g = Vec::with_capacity(routes[e].tokens.len() * hidden);
                for &t in &routes[e].tokens {
                    g.extend_from_slice(&xs[t as usize * hidden..(t as usize + 1) * hidden]);
                }
                g
            })
            .collect();
        let inputs: Vec<(&[f32], usize)> = gathered
            .iter()
            .zip(&active)
            .map(|(g, &e)| (g.as_slice(), routes[e].tokens.len()))
            .collect();
        let which: Vec<usize> = (0..active.len()).flat_map(|k| [k, k]).collect();
        let mut gu = QMatrix::matmul_grouped(&gate_up, &which, &inputs)?.into_iter();
        let mut hs = Vec::with_capacity(active.len());
        while let (Some(mut g), Some(u)) = (gu.next(), gu.next()) {
            crate::cpu_ops::silu_mul_slice(&mut g, &u);
            hs.push(g);
        }
        let inputs: Vec<(&[f32], usize)> = hs
            .iter()
            .zip(&active)
            .map(|(h, &e)| (h.as_slice(), routes[e].tokens.len()))
            .collect();
        let which: Vec<usize> = (0..active.len()).collect();
        let ys = QMatrix::matmul_grouped(&down, &which, &inputs)?;
        // Ascending expert order, as the expert-by-expert path adds them.
        let mut out = vec![0f32; tokens * hidden];
        for (&e, y) in active.iter().zip(&ys) {
            let r = &routes[e];
            for ((&t, &w), row) in r.tokens.iter().zip(&r.weights).zip(y.chunks(hidden)) {
                let o = &mut out[t as usize * hidden..(t as usize + 1) * hidden];
                for (o, v) in o.iter_mut().zip(row) {
                    *o += v * w;
                }
            }
        }
        let out = Tensor::from_vec(out, (tokens, hidden), &Device::Cpu)?;
        Ok(Some(out.to_dtype(x.dtype())?))
    }
}

fn softmax(scores: &[f32]) -> Vec<f32> {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = scores.iter().map(|&s| (s - max).exp()).collect();
    let sum: f32 = e.iter().sum();
    e.into_iter().map(|v| v / sum).collect()
}

/// Each token's `top_k` experts by probability (ties to the lower index),
/// their weights renormalised to sum to 1 when `normalize`, grouped by
/// expert: entry `e` lists the tokens that chose expert `e`, in token order.
pub fn route(
    probs: &[Vec<f32>],
    num_experts: usize,
    top_k: usize,
    normalize: bool,
) -> Result<Vec<Routed>> {
    let mut routes = vec![Routed::default(); num_experts];
    for (t, p) in probs.iter().enumerate() {
        if p.len() != num_experts {
            return Err(Error::InvalidRequest(format!(
                "the router scored {} experts, the layer has {num_experts}",
                p.len()
            )));
        }
        let mut order: Vec<usize> = (0..num_experts).collect();
        // Stable: equal probabilities keep the lower expert first.
        order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
        let chosen = &order[..top_k.min(num_experts)];
        let sum: f32 = chosen.iter().map(|&e| p[e]).sum();
        for &e in chosen {
            let w = if normalize { p[e] / sum } else { p[e] };
            routes[e].tokens.push(t as u32);
            routes[e].weights.push(w);
        }
    }
    Ok(routes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A quantized block in Q4_K_M's mix (gate and up Q4_K, down Q6_K) and
    /// in Q8_0: the grouped passes give the bits of the expert-by-expert
    /// path, for a decode step's token and for a batch.
    #[test]
    fn grouped_experts_give_the_bits_of_one_expert_at_a_time() -> Result<()> {
        use crate::quant::Quant;
        let (hidden, inter, experts) = (256, 512, 6);
        let mut seed = 7u32;
        let mut rand = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
                })
                .collect()
        };
        let dev = Device::Cpu;
        for (gu_q, down_q) in [(Quant::Q4K, Quant::Q6K), (Quant::Q8_0, Quant::Q8_0)] {
            let mut mlps = Vec::new();
            for _ in 0..experts {
                let m = |q, rows, cols, data: Vec<f32>| -> Result<Linear> {
                    Linear::quantized(Tensor::from_vec(data, (rows, cols), &dev)?, None, q)
                };
                mlps.push(Mlp {
                    gate: m(gu_q, inter, hidden, rand(inter * hidden))?,
                    up: m(gu_q, inter, hidden, rand(inter * hidden))?,
                    down: m(down_q, hidden, inter, rand(hidden * inter))?,
                    activation: Activation::Silu,
                });
            }
            let block = MoeBlock {
                router: Linear::new(Tensor::from_vec(rand(experts * hidden), (experts, hidden), &dev)?, None),
                experts: mlps,
                top_k: 2,
                norm_topk_prob: true,
            };
            for tokens in [1, 9] {
                let x = Tensor::from_vec(rand(tokens * hidden), (tokens, hidden), &dev)?;
                let scores = block.router.forward(&x)?.to_vec2::<f32>()?;
                let probs: Vec<Vec<f32>> = scores.iter().map(|s| softmax(s)).collect();
                let routes = route(&probs, experts, 2, true)?;
                let grouped = block
                    .forward_grouped(&x, &routes)?
                    .expect("a quantized SiLU block is grouped")
                    .to_vec2::<f32>()?;
                let one_by_one = block.forward_by_expert(&x, &routes)?.to_vec2::<f32>()?;
                assert!(
                    grouped == one_by_one,
                    "{gu_q:?}/{down_q:?}, {tokens} tokens: the grouped passes changed bits"
                );
                assert!(grouped.iter().flatten().any(|v| *v != 0.0));
            }
        }
        Ok(())
    }

    #[test]
    fn tokens_go_to_their_top_experts_grouped_by_expert() -> Result<()> {
        let probs = vec![
            vec![0.1, 0.6, 0.3, 0.0],
            vec![0.25, 0.25, 0.4, 0.1],
            vec![0.7, 0.1, 0.1, 0.1],
        ];
        let r = route(&probs, 4, 2, false)?;
        // Token 1's tie between experts 0 and 1 goes to the lower index.
        assert_eq!(r[0].tokens, vec![1, 2]);
        assert_eq!(r[1].tokens, vec![0, 2]);
        assert_eq!(r[2].tokens, vec![0, 1]);
        assert!(r[3].tokens.is_empty());
        assert_eq!(r[1].weights, vec![0.6, 0.1]);

        let r = route(&probs, 4, 2, true)?;
        let w0: f32 = r[1].weights[0] + r[2].weights[0];
        assert!((w0 - 1.0).abs() < 1e-6, "token 0's weights sum to {w0}");
        assert!((r[1].weights[0] - 0.6 / 0.9).abs() < 1e-6);
        assert!(
            route(&probs, 3, 2, true).is_err(),
            "a width mismatch is named"
        );
        Ok(())
    }
}
