//! Finished sequences' KV caches, kept for requests that start with the
//! same tokens (a long system prompt, a chat's earlier turns).
//!
//! Entries are found by block: the prompt is cut into full blocks of
//! `block_size` tokens, and block `i` is keyed by a hash of its tokens
//! chained with block `i - 1`'s key, so one key names a whole prefix. A
//! lookup walks the prompt's chain as far as some entry holds it and copies
//! that many positions into the new sequence's cache; the entry stays, for
//! the next request. Entries count their blocks against the engine's KV
//! budget and are evicted least recently used first when memory is needed.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use crate::kv_cache::SeqKvCache;
use crate::Result;

struct Entry {
    cache: SeqKvCache,
    /// Chain keys of the cache's full blocks.
    keys: Vec<u64>,
    /// Blocks the entry holds (its buffers' size, not only its full blocks).
    blocks: usize,
    last_used: u64,
}

/// A match: `tokens` positions (whole blocks) of entry `entry`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Hit {
    pub entry: u64,
    pub tokens: usize,
}

/// The LRU of cached prefixes, indexed by block-hash chain.
pub(super) struct PrefixCache {
    block_size: usize,
    entries: HashMap<u64, Entry>,
    /// Chain key → the entries holding that prefix.
    index: HashMap<u64, Vec<u64>>,
    next_id: u64,
    clock: u64,
    blocks: usize,
}

/// Chain keys of the first `max_blocks` full blocks of `tokens`.
fn chain_keys(tokens: &[u32], block_size: usize, max_blocks: usize) -> Vec<u64> {
    let mut keys = Vec::new();
    let mut prev = 0u64;
    for block in tokens.chunks_exact(block_size).take(max_blocks) {
        let mut h = DefaultHasher::new();
        prev.hash(&mut h);
        block.hash(&mut h);
        prev = h.finish();
        keys.push(prev);
    }
    keys
}

impl PrefixCache {
    pub fn new(block_size: usize) -> Self {
        PrefixCache {
            block_size,
            entries: HashMap::new(),
            index: HashMap::new(),
            next_id: 0,
            clock: 0,
            blocks: 0,
        }
    }

    /// Blocks held by all entries.
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    /// The longest whole-block prefix of `prompt` some entry holds, leaving
    /// at least the prompt's last token to compute (its logits pick the
    /// first new token). Marks the entry used.
    pub fn lookup(&mut self, prompt: &[u32]) -> Option<Hit> {
        let max_blocks = prompt.len().saturating_sub(1) / self.block_size;
        let keys = chain_keys(prompt, self.block_size, max_blocks);
        let depth = keys
            .iter()
            .take_while(|k| self.index.contains_key(k))
            .count();
        if depth == 0 {
            return None;
        }
        let tokens = depth * self.block_size;
        // Check the tokens themselves: a hash collision must not serve
        // another prompt's keys and values.
        let entry = self.index[&keys[depth - 1]]
            .iter()
            .copied()
            .filter(|id| self.entries[id].cache.tokens().get(..tokens) == Some(&prompt[..tokens]))
            .max_by_key(|id| self.entries[id].last_used)?;
        self.clock += 1;
        if let Some(e) = self.entries.get_mut(&entry) {
            e.last_used = self.clock;
        }
        Some(Hit { entry, tokens })
    }

    /// A new cache holding the hit's positions, sized for `capacity`.
    pub fn copy(&self, hit: Hit, capacity: usize) -> Result<SeqKvCache> {
        self.entries[&hit.entry]
            .cache
            .copy_prefix(hit.tokens, capacity)
    }

    /// Keeps `cache` (which holds `blocks` blocks). An entry whose tokens
    /// the new one extends is dropped; a cache that an entry already
    /// extends, or that has no full block, is not kept. Returns whether it
    /// was kept.
    pub fn insert(&mut self, cache: SeqKvCache, blocks: usize) -> bool {
        let tokens = cache.tokens();
        if tokens.len() < self.block_size {
            return false;
        }
        self.clock += 1;
        let mut subsumed = Vec::new();
        for (&id, e) in self.entries.iter_mut() {
            let old = e.cache.tokens();
            if old.len() >= tokens.len() && old.starts_with(tokens) {
                e.last_used = self.clock;
                return false;
            }
            if tokens.starts_with(old) {
                subsumed.push(id);
            }
        }
        for id in subsumed {
            self.remove(id);
        }
        let keys = chain_keys(tokens, self.block_size, usize::MAX);
        let id = self.next_id;
        self.next_id += 1;
        for k in &keys {
            self.index.entry(*k).or_default().push(id);
        }
        self.blocks += blocks;
        self.entries.insert(
            id,
            Entry {
                cache,
                keys,
                blocks,
                last_used: self.clock,
            },
        );
        true
    }

    /// Drops the least recently used entry other than `keep`; returns the
    /// blocks freed, or `None` when there is nothing to drop.
    pub fn evict_lru(&mut self, keep: Option<u64>) -> Option<usize> {
        let id = self
            .entries
            .iter()
            .filter(|(id, _)| Some(**id) != keep)
            .min_by_key(|(_, e)| e.last_used)
            .map(|(id, _)| *id)?;
        self.remove(id)
    }

    fn remove(&mut self, id: u64) -> Option<usize> {
        let e = self.entries.remove(&id)?;
        for k in &e.keys {
            if let Some(ids) = self.index.get_mut(k) {
                ids.retain(|&x| x != id);
                if ids.is_empty() {
                    self.index.remove(k);
                }
            }
        }
        self.blocks -= e.blocks;
        Some(e.blocks)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    /// A one-layer cache holding `tokens`, with position i's key = i.
    fn cache_of(tokens: &[u32]) -> SeqKvCache {
        let mut c = SeqKvCache::new(1);
        let n = tokens.len();
        let k = Tensor::arange(0f32, n as f32, &Device::Cpu)
            .and_then(|t| t.reshape((1, n, 1)))
            .expect("tensor");
        c.append(0, &k, &k).expect("append");
        c.advance(tokens);
        c
    }

    #[test]
    fn finds_the_longest_whole_block_prefix_and_copies_it() -> Result<()> {
        let mut p = PrefixCache::new(4);
        let a: Vec<u32> = (0..11).collect();
        assert!(p.insert(cache_of(&a), 3));
        assert_eq!(p.blocks(), 3);
        // Shares 9 tokens: two whole blocks.
        let mut prompt: Vec<u32> = (0..9).collect();
        prompt.extend([50, 51, 52]);
        let hit = p.lookup(&prompt).expect("hit");
        assert_eq!(hit.tokens, 8);
        let c = p.copy(hit, 16)?;
        assert_eq!(c.tokens(), &a[..8]);
        assert_eq!(c.capacity(), 16);
        // The last prompt token is always left to compute.
        assert_eq!(p.lookup(&a[..8]).map(|h| h.tokens), Some(4));
        assert_eq!(p.lookup(&[9, 9, 9, 9, 9]), None);
        Ok(())
    }

    #[test]
    fn extensions_replace_entries_and_eviction_is_lru() {
        let mut p = PrefixCache::new(4);
        let a: Vec<u32> = (0..8).collect();
        let b: Vec<u32> = (0..12).collect();
        let c: Vec<u32> = (100..108).collect();
        assert!(p.insert(cache_of(&a), 2));
        assert!(p.insert(cache_of(&b), 3), "b extends a");
        assert_eq!(p.blocks(), 3, "a was dropped");
        assert!(!p.insert(cache_of(&a), 2), "b already holds a");
        assert!(!p.insert(cache_of(&[1, 2]), 1), "no whole block");
        assert!(p.insert(cache_of(&c), 2));
        // b was used after c was inserted: c goes first.
        assert!(p.lookup(&b).is_some());
        assert_eq!(p.evict_lru(None), Some(2));
        assert_eq!(p.lookup(&c), None);
        let keep = p.lookup(&b).map(|h| h.entry);
        assert_eq!(p.evict_lru(keep), None);
        assert_eq!(p.evict_lru(None), Some(3));
        assert_eq!(p.blocks(), 0);
    }
}
