//! KV memory in fixed-size blocks: how many bytes a block of positions
//! takes for a model, and how much memory the engine budgets by default.
//!
//! Blocks are the engine's unit of accounting and of prefix sharing; the
//! keys and values themselves stay in each sequence's contiguous
//! [`SeqKvCache`](crate::kv_cache::SeqKvCache) buffers, sized to the blocks
//! reserved (see `docs/ARCHITECTURE.md` for why storage is not paged).

use crate::models::Decoder;

/// Positions per block unless configured otherwise.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// Share of `MemAvailable` the default budget may take.
const DEFAULT_MEM_SHARE: f64 = 0.25;

/// Bytes one position takes across all layers: keys and values, every KV
/// head, in the model's dtype.
pub fn bytes_per_position(model: &Decoder) -> usize {
    let c = model.config();
    2 * c.num_layers * c.num_kv_heads * c.head_dim * model.dtype().size_in_bytes()
}

/// The default KV budget: what `max_batch` sequences of the model's full
/// context need, but at most a quarter of the memory the kernel reports
/// available (`MemAvailable`; where it is unknown, only the first bound).
/// On a GPU the host's memory is only a proxy: pass `--kv-cache-mem` there.
pub fn default_budget_bytes(model: &Decoder, max_batch: usize) -> usize {
    let context = model.config().max_position_embeddings;
    let need = max_batch
        .max(1)
        .saturating_mul(context)
        .saturating_mul(bytes_per_position(model));
    match mem_available() {
        Some(avail) => need.min((avail as f64 * DEFAULT_MEM_SHARE) as usize),
        None => need,
    }
}

/// `MemAvailable` from `/proc/meminfo`, in bytes (Linux only).
pub fn mem_available() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_available(&text)
}

fn parse_mem_available(meminfo: &str) -> Option<usize> {
    let line = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?;
    let kib: usize = line.trim().trim_end_matches("kB").trim().parse().ok()?;
    kib.checked_mul(1024)
}

/// Blocks that `positions` positions occupy.
pub fn blocks_for(positions: usize, block_size: usize) -> usize {
    positions.div_ceil(block_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mem_available_in_bytes() {
        let text = "MemTotal:       24576000 kB\nMemFree:  100 kB\nMemAvailable:   23887144 kB\n";
        assert_eq!(parse_mem_available(text), Some(23_887_144 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn blocks_round_up() {
        assert_eq!(blocks_for(0, 16), 0);
        assert_eq!(blocks_for(1, 16), 1);
        assert_eq!(blocks_for(16, 16), 1);
        assert_eq!(blocks_for(17, 16), 2);
    }
}
