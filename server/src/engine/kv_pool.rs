//! The preallocated K/V memory: fixed-size blocks in the run dtype, and a paged view of it that
//! the model's forward reads and writes through [`KvCache`].

use halfstep_model::kv::{KvCache, KvVisitor};
use halfstep_model::Elem;

/// Index of a K/V block in the pool.
pub type BlockId = u32;

/// All K/V blocks of every layer: `[layer][block][position in block][kv_dim]`, keys and values
/// in two arrays.
pub struct KvPool<T: Elem> {
    layers: usize,
    num_blocks: usize,
    block_size: usize,
    kv_dim: usize,
    keys: Vec<T>,
    values: Vec<T>,
}

impl<T: Elem> KvPool<T> {
    /// Allocates `num_blocks` blocks of `block_size` positions.
    pub fn new(layers: usize, num_blocks: usize, block_size: usize, kv_dim: usize) -> Self {
        let n = layers * num_blocks * block_size * kv_dim;
        KvPool {
            layers,
            num_blocks,
            block_size,
            kv_dim,
            keys: halfstep_model::mem::huge_vec(n, T::default()),
            values: halfstep_model::mem::huge_vec(n, T::default()),
        }
    }

    /// Bytes one block takes across all layers, keys and values.
    pub fn bytes_per_block(layers: usize, block_size: usize, kv_dim: usize) -> usize {
        2 * layers * block_size * kv_dim * std::mem::size_of::<T>()
    }

    /// Positions per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    fn offset(&self, layer: usize, block: BlockId, slot: usize) -> usize {
        ((layer * self.num_blocks + block as usize) * self.block_size + slot) * self.kv_dim
    }

    /// Copies every layer's K/V of block `src` into `dst` (copy-on-write of a shared block).
    pub fn copy_block(&mut self, src: BlockId, dst: BlockId) {
        let len = self.block_size * self.kv_dim;
        for layer in 0..self.layers {
            let (s, d) = (self.offset(layer, src, 0), self.offset(layer, dst, 0));
            self.keys.copy_within(s..s + len, d);
            self.values.copy_within(s..s + len, d);
        }
    }

    /// A view that addresses sequence `i` of a batch through `tables[i]`.
    pub fn view<'a>(&'a mut self, tables: &'a [&'a [BlockId]]) -> PagedView<'a, T> {
        PagedView { pool: self, tables }
    }
}

/// The pool seen through the block tables of one batch; sequence handles are batch indices.
pub struct PagedView<'a, T: Elem> {
    pool: &'a mut KvPool<T>,
    tables: &'a [&'a [BlockId]],
}

impl<T: Elem> KvCache<T> for PagedView<'_, T> {
    fn write(&mut self, layer: usize, seq: usize, pos: usize, k: &[T], v: &[T]) {
        let bs = self.pool.block_size;
        let block = self.tables[seq][pos / bs];
        let o = self.pool.offset(layer, block, pos % bs);
        let d = self.pool.kv_dim;
        self.pool.keys[o..o + d].copy_from_slice(k);
        self.pool.values[o..o + d].copy_from_slice(v);
    }

    fn read<'s>(&'s self, layer: usize, seq: usize, len: usize, f: &mut KvVisitor<'_, 's, T>) {
        let bs = self.pool.block_size;
        let d = self.pool.kv_dim;
        let mut p = 0;
        for &block in self.tables[seq] {
            if p >= len {
                break;
            }
            let n = bs.min(len - p);
            let o = self.pool.offset(layer, block, 0);
            f(
                p,
                &self.pool.keys[o..o + n * d],
                &self.pool.values[o..o + n * d],
            );
            p += n;
        }
    }
}
