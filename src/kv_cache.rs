//! Per-sequence key/value caches, owned outside the model.
//!
//! The decoder reads and appends to the cache of each sequence it is given;
//! who owns the caches (a CLI loop, a scheduler) decides when they are
//! created, reset or dropped. Storage grows in place: each layer keeps a
//! buffer with spare capacity and new positions are written into it, so a
//! decode step copies only the new token's keys and values, not the history.
//!
//! An owner that budgets memory (the engine, in KV blocks) says how many
//! positions it has reserved with [`SeqKvCache::reserve`]; the buffers are
//! then exactly that large, so what the engine counts is what is allocated.
//! Without a reservation they grow in 256-position chunks.

use candle_core::{DType, Device, Tensor};

use crate::Result;

/// Keys and values of one layer: `[kv_heads, capacity, head_dim]` buffers,
/// of which the first `len` positions are filled.
#[derive(Debug, Clone)]
struct LayerCache {
    k: Tensor,
    v: Tensor,
}

/// The KV cache of one sequence across all layers.
#[derive(Debug, Clone)]
pub struct SeqKvCache {
    layers: Vec<Option<LayerCache>>,
    /// Positions stored (the same in every layer once a forward pass is done).
    len: usize,
    /// The token at each stored position, so a caller can reuse the longest
    /// common prefix with a new prompt instead of recomputing it.
    tokens: Vec<u32>,
    /// Positions the owner has reserved (0: none; grow by chunks).
    reserved: usize,
}

/// Capacity is rounded up to this many positions, so growth is rare.
const GROWTH_CHUNK: usize = 256;

impl SeqKvCache {
    /// An empty cache for a model with `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        SeqKvCache {
            layers: vec![None; num_layers],
            len: 0,
            tokens: Vec::new(),
            reserved: 0,
        }
    }

    /// Sizes the buffers for `positions` positions: the next append that
    /// needs to grow them allocates exactly this many. Buffers never
    /// shrink, and a reservation below the current length is ignored.
    pub fn reserve(&mut self, positions: usize) {
        self.reserved = positions;
    }

    /// Positions the buffers can hold without growing (0 before the first
    /// append).
    pub fn capacity(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .next()
            .map_or(0, |c| c.k.dim(1).unwrap_or(0))
    }

    /// A new cache holding copies of the first `n` positions, its buffers
    /// sized for `capacity` positions (at least `n`): how a sequence starts
    /// from a cached prefix while the cache stays available to others.
    pub fn copy_prefix(&self, n: usize, capacity: usize) -> Result<SeqKvCache> {
        let n = n.min(self.len);
        let capacity = capacity.max(n);
        let copy = |t: &Tensor| -> Result<Tensor> {
            let (kv_heads, _, head_dim) = t.dims3()?;
            let fresh = Tensor::zeros((kv_heads, capacity, head_dim), t.dtype(), t.device())?;
            if n > 0 {
                fresh.slice_set(&t.narrow(1, 0, n)?.contiguous()?, 1, 0)?;
            }
            Ok(fresh)
        };
        let layers = self
            .layers
            .iter()
            .map(|l| {
                l.as_ref()
                    .map(|c| {
                        Ok(LayerCache {
                            k: copy(&c.k)?,
                            v: copy(&c.v)?,
                        })
                    })
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(SeqKvCache {
            layers,
            len: n,
            tokens: self.tokens[..n].to_vec(),
            reserved: capacity,
        })
    }

    /// Number of positions already cached: the position of the next token.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The tokens whose keys and values are stored, in order.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Drops everything, keeping the allocation for reuse.
    pub fn reset(&mut self) {
        self.truncate(0);
    }

    /// Forgets every position from `len` on (e.g. to re-run a suffix).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        self.tokens.truncate(self.len);
    }

    /// Records `tokens` as filled; called by the decoder once every layer
    /// has appended them.
    pub(crate) fn advance(&mut self, tokens: &[u32]) {
        self.len += tokens.len();
        self.tokens.extend_from_slice(tokens);
    }

    /// Writes `k` and `v` (`[kv_heads, n, head_dim]`) for `layer` at the
    /// current end and returns views of all cached keys and values
    /// (`[kv_heads, len + n, head_dim]`).
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (kv_heads, n, head_dim) = k.dims3()?;
        let needed = self.len + n;
        let slot = &mut self.layers[layer];
        let capacity = slot.as_ref().map_or(0, |c| c.k.dim(1).unwrap_or(0));
        if needed > capacity {
            let new_cap = if needed <= self.reserved {
                self.reserved
            } else {
                (needed.div_ceil(GROWTH_CHUNK) * GROWTH_CHUNK).max(capacity * 2)
            };
            let grow = |old: Option<&Tensor>, dtype: DType, device: &Device| -> Result<Tensor> {
                let fresh = Tensor::zeros((kv_heads, new_cap, head_dim), dtype, device)?;
                if let Some(old) = old {
                    if self.len > 0 {
                        fresh.slice_set(&old.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                    }
                }
                Ok(fresh)
            };
            let new_k = grow(slot.as_ref().map(|c| &c.k), k.dtype(), k.device())?;
            let new_v = grow(slot.as_ref().map(|c| &c.v), v.dtype(), v.device())?;
            *slot = Some(LayerCache { k: new_k, v: new_v });
        }
        let Some(cache) = slot.as_ref() else {
            unreachable!("the slot was filled just above")
        };
        cache.k.slice_set(&k.contiguous()?, 1, self.len)?;
        cache.v.slice_set(&v.contiguous()?, 1, self.len)?;
        Ok((cache.k.narrow(1, 0, needed)?, cache.v.narrow(1, 0, needed)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_and_grows() -> Result<()> {
        let dev = Device::Cpu;
        let mut c = SeqKvCache::new(1);
        let a = Tensor::arange(0f32, 6., &dev)?.reshape((1, 3, 2))?;
        let (k, _) = c.append(0, &a, &a)?;
        assert_eq!(k.dims(), &[1, 3, 2]);
        c.advance(&[1, 2, 3]);
        // Past the first chunk: forces a reallocation that must keep history.
        let big = Tensor::ones((1, 300, 2), DType::F32, &dev)?;
        let (k, v) = c.append(0, &big, &big)?;
        c.advance(&[7; 300]);
        assert_eq!(k.dims(), &[1, 303, 2]);
        assert_eq!(
            k.narrow(1, 0, 3)?.flatten_all()?.to_vec1::<f32>()?,
            vec![0., 1., 2., 3., 4., 5.]
        );
        assert_eq!(
            v.narrow(1, 3, 1)?.flatten_all()?.to_vec1::<f32>()?,
            vec![1., 1.]
        );
        assert_eq!(c.len(), 303);
        c.truncate(2);
        assert_eq!(c.len(), 2);
        assert_eq!(c.tokens(), &[1, 2]);
        Ok(())
    }

    #[test]
    fn a_reservation_sizes_the_buffers_exactly_and_prefixes_copy() -> Result<()> {
        let dev = Device::Cpu;
        let mut c = SeqKvCache::new(1);
        c.reserve(16);
        let a = Tensor::arange(0f32, 10., &dev)?.reshape((1, 5, 2))?;
        c.append(0, &a, &a)?;
        c.advance(&[1, 2, 3, 4, 5]);
        assert_eq!(c.capacity(), 16);
        c.reserve(32);
        let b = Tensor::ones((1, 12, 2), DType::F32, &dev)?;
        c.append(0, &b, &b)?;
        c.advance(&[9; 12]);
        assert_eq!(c.capacity(), 32);

        let p = c.copy_prefix(3, 8)?;
        assert_eq!((p.len(), p.capacity()), (3, 8));
        assert_eq!(p.tokens(), &[1, 2, 3]);
        let mut p = p;
        let (k, _) = p.append(0, &a.narrow(1, 0, 1)?, &a.narrow(1, 0, 1)?)?;
        assert_eq!(
            k.flatten_all()?.to_vec1::<f32>()?,
            vec![0., 1., 2., 3., 4., 5., 0., 1.]
        );
        assert_eq!(p.capacity(), 8, "the copy's reservation holds");
        assert_eq!(c.len(), 17, "the source is untouched");
        Ok(())
    }
}
