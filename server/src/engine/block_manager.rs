//! K/V block bookkeeping: free list, reference counts, hash-chained prefix caching of full
//! blocks (like vLLM's automatic prefix caching) and copy-on-write for shared blocks.
//!
//! The manager never touches K/V memory itself; it hands out block ids and says when a block
//! must be copied ([`BlockManager::prepare_append`]).

use super::kv_pool::BlockId;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};

/// Hash of a full block's tokens chained with the hash of the blocks before it.
pub type BlockHash = u64;

#[derive(Debug, Clone)]
struct CachedBlock {
    hash: BlockHash,
    tokens: Vec<u32>,
}

/// Hands out K/V blocks and remembers full blocks by content for prefix reuse.
#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    ref_counts: Vec<u32>,
    // Blocks with no owner and no cached content.
    free: Vec<BlockId>,
    // Blocks with no owner whose content is cached, least recently freed first (evicted first).
    evictable: VecDeque<BlockId>,
    cached: HashMap<BlockHash, BlockId>,
    block_content: HashMap<BlockId, CachedBlock>,
    enable_prefix_caching: bool,
    // Roots every hash chain: bumped when the cache is reset (new weights), so blocks of
    // sequences that straddle the reset can never match a later lookup.
    epoch: u64,
    /// Prefix-cache lookups (in tokens) since start.
    pub prefix_queries: u64,
    /// Prefix-cache hits (in tokens) since start.
    pub prefix_hits: u64,
}

/// Chains a block's tokens onto the hash of its prefix.
pub fn chain_hash(parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// What appending a token needs from the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendAction {
    /// The slot is in an exclusively owned block.
    None,
    /// A new block was appended to the table.
    NewBlock,
    /// The last block was shared; copy `src` into the new `dst`, which replaced it.
    CopyOnWrite {
        /// The shared block.
        src: BlockId,
        /// Its private copy.
        dst: BlockId,
    },
}

impl BlockManager {
    /// A manager of `num_blocks` blocks of `block_size` positions.
    pub fn new(num_blocks: usize, block_size: usize, enable_prefix_caching: bool) -> Self {
        BlockManager {
            block_size,
            ref_counts: vec![0; num_blocks],
            free: (0..num_blocks as BlockId).rev().collect(),
            evictable: VecDeque::new(),
            cached: HashMap::new(),
            block_content: HashMap::new(),
            enable_prefix_caching,
            epoch: 0,
            prefix_queries: 0,
            prefix_hits: 0,
        }
    }

    /// Positions per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in total.
    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    /// Blocks that can be handed out now (free or evictable).
    pub fn num_free(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Blocks needed to hold `tokens` positions.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    fn take(&mut self) -> Option<BlockId> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let b = self.evictable.pop_front()?;
                if let Some(c) = self.block_content.remove(&b) {
                    if self.cached.get(&c.hash) == Some(&b) {
                        self.cached.remove(&c.hash);
                    }
                }
                b
            }
        };
        self.ref_counts[b as usize] = 1;
        Some(b)
    }

    fn retain(&mut self, b: BlockId) {
        if self.ref_counts[b as usize] == 0 {
            // A cached block comes back into use: it is no longer evictable.
            if let Some(i) = self.evictable.iter().position(|&x| x == b) {
                self.evictable.remove(i);
            }
        }
        self.ref_counts[b as usize] += 1;
    }

    /// Allocates blocks for a prompt, reusing cached full blocks of its longest cached prefix.
    ///
    /// Returns the block table and how many leading tokens are already computed, or `None`
    /// (and changes nothing) if there are not enough blocks. At least one token is always left
    /// to compute, so that the prompt's last logits get computed.
    pub fn allocate_prompt(
        &mut self,
        tokens: &[u32],
        use_cache: bool,
    ) -> Option<(Vec<BlockId>, usize)> {
        let bs = self.block_size;
        let mut hits = Vec::new();
        if self.enable_prefix_caching && use_cache {
            let mut parent = Some(self.epoch);
            for chunk in tokens.chunks_exact(bs) {
                let h = chain_hash(parent, chunk);
                match self.cached.get(&h) {
                    Some(&b)
                        if self
                            .block_content
                            .get(&b)
                            .is_some_and(|c| c.tokens == chunk) =>
                    {
                        hits.push(b)
                    }
                    _ => break,
                }
                parent = Some(h);
            }
            if hits.len() * bs >= tokens.len() {
                hits.pop();
            }
        }
        let need = self.blocks_for(tokens.len().max(1)) - hits.len();
        let hit_free = hits
            .iter()
            .filter(|&&b| self.ref_counts[b as usize] == 0)
            .count();
        if self.num_free() - hit_free < need {
            return None;
        }
        if self.enable_prefix_caching && use_cache {
            self.prefix_queries += tokens.len() as u64;
            self.prefix_hits += (hits.len() * bs) as u64;
        }
        let computed = hits.len() * bs;
        let mut table = Vec::with_capacity(hits.len() + need);
        for b in hits {
            self.retain(b);
            table.push(b);
        }
        for _ in 0..need {
            table.push(self.take().expect("counted free blocks"));
        }
        Some((table, computed))
    }

    /// Makes sure position `pos` has an exclusively owned slot in `table`.
    ///
    /// Returns `None` (and changes nothing) if a block is needed and none is free.
    pub fn prepare_append(&mut self, table: &mut Vec<BlockId>, pos: usize) -> Option<AppendAction> {
        let idx = pos / self.block_size;
        if idx == table.len() {
            let b = self.take()?;
            table.push(b);
            return Some(AppendAction::NewBlock);
        }
        let b = table[idx];
        if self.ref_counts[b as usize] > 1 {
            let dst = self.take()?;
            self.ref_counts[b as usize] -= 1;
            table[idx] = dst;
            return Some(AppendAction::CopyOnWrite { src: b, dst });
        }
        Some(AppendAction::None)
    }

    /// Shares every block of `table` with a new owner (an `n > 1` sibling).
    pub fn fork(&mut self, table: &[BlockId]) -> Vec<BlockId> {
        for &b in table {
            self.retain(b);
        }
        table.to_vec()
    }

    /// Registers the full blocks among the first `computed` tokens in the prefix cache.
    ///
    /// `hashes` holds the chain hashes of blocks registered before; only new full blocks are
    /// hashed.
    pub fn cache_full_blocks(
        &mut self,
        table: &[BlockId],
        tokens: &[u32],
        hashes: &mut Vec<BlockHash>,
    ) {
        if !self.enable_prefix_caching {
            return;
        }
        let full = tokens.len() / self.block_size;
        while hashes.len() < full.min(table.len()) {
            let i = hashes.len();
            let chunk = &tokens[i * self.block_size..(i + 1) * self.block_size];
            let h = chain_hash(Some(hashes.last().copied().unwrap_or(self.epoch)), chunk);
            hashes.push(h);
            let b = table[i];
            if self.block_content.contains_key(&b) || self.cached.contains_key(&h) {
                continue;
            }
            self.cached.insert(h, b);
            self.block_content.insert(
                b,
                CachedBlock {
                    hash: h,
                    tokens: chunk.to_vec(),
                },
            );
        }
    }

    /// Releases one owner's blocks; cached blocks stay reusable until evicted.
    pub fn free(&mut self, table: &[BlockId]) {
        // Freed in reverse so a sequence's tail blocks are evicted before its head.
        for &b in table.iter().rev() {
            let rc = &mut self.ref_counts[b as usize];
            debug_assert!(*rc > 0, "double free of block {b}");
            *rc = rc.saturating_sub(1);
            if *rc == 0 {
                if self.block_content.contains_key(&b) {
                    self.evictable.push_back(b);
                } else {
                    self.free.push(b);
                }
            }
        }
    }

    /// Forgets every cached block (after a weight update, cached K/V are stale).
    pub fn reset_prefix_cache(&mut self) {
        self.epoch += 1;
        self.cached.clear();
        self.block_content.clear();
        self.free.extend(self.evictable.drain(..));
    }

    /// Whether every block is unowned (free or merely cached).
    pub fn all_free(&self) -> bool {
        self.ref_counts.iter().all(|&r| r == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_hits_reuse_full_blocks_and_leave_one_token_to_compute() {
        let mut bm = BlockManager::new(16, 4, true);
        let prompt: Vec<u32> = (0..10).collect();
        let (t1, c1) = bm.allocate_prompt(&prompt, true).unwrap();
        assert_eq!((t1.len(), c1), (3, 0));
        bm.cache_full_blocks(&t1, &prompt, &mut Vec::new());
        let (t2, c2) = bm.allocate_prompt(&prompt, true).unwrap();
        assert_eq!(c2, 8);
        assert_eq!(&t2[..2], &t1[..2]);
        assert_ne!(t2[2], t1[2]);
        // A prompt that is exactly two full blocks recomputes its last block.
        let (t3, c3) = bm.allocate_prompt(&prompt[..8], true).unwrap();
        assert_eq!((c3, t3[0]), (4, t1[0]));
        bm.free(&t1);
        bm.free(&t2);
        bm.free(&t3);
        assert!(bm.all_free());
        assert_eq!(bm.num_free(), 16);
    }

    #[test]
    fn shared_last_block_is_copied_on_write() {
        let mut bm = BlockManager::new(8, 4, false);
        let (mut a, _) = bm.allocate_prompt(&[1, 2, 3, 4, 5, 6], true).unwrap();
        let mut b = bm.fork(&a);
        assert_eq!(
            bm.prepare_append(&mut a, 6),
            Some(AppendAction::CopyOnWrite {
                src: b[1],
                dst: a[1]
            })
        );
        assert_eq!(bm.prepare_append(&mut b, 6), Some(AppendAction::None));
        assert_eq!(bm.prepare_append(&mut b, 8), Some(AppendAction::NewBlock));
        bm.free(&a);
        bm.free(&b);
        assert!(bm.all_free());
    }

    #[test]
    fn allocation_fails_cleanly_when_blocks_run_out() {
        let mut bm = BlockManager::new(2, 4, true);
        assert!(bm.allocate_prompt(&[0; 9], true).is_none());
        assert_eq!(bm.num_free(), 2);
        let (mut t, _) = bm.allocate_prompt(&[0; 8], true).unwrap();
        assert!(bm.prepare_append(&mut t, 8).is_none());
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn evictable_blocks_are_reused_when_free_ones_run_out() {
        let mut bm = BlockManager::new(2, 2, true);
        let p = [7, 8, 9, 10];
        let (t, _) = bm.allocate_prompt(&p, true).unwrap();
        bm.cache_full_blocks(&t, &p, &mut Vec::new());
        bm.free(&t);
        assert_eq!(bm.num_free(), 2);
        let (t2, c) = bm.allocate_prompt(&[1, 2, 3], true).unwrap();
        assert_eq!((t2.len(), c), (2, 0));
        bm.free(&t2);
        assert!(bm.all_free());
    }
}
