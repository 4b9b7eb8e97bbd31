//! Where attention keeps keys and values: the [`KvCache`] trait and two plain stores.
//!
//! The server implements the trait over its paged block pool; the trainer and tests use
//! [`ContiguousKv`]. [`PagedKv`] is a minimal paged store for parity tests of the model alone.

use crate::dtype::Elem;

/// Receives runs of consecutive positions: `(first_position, keys, values)`.
/// The slices borrow from the store itself (lifetime `'s`), so a visitor may keep them while
/// the store stays borrowed.
pub type KvVisitor<'a, 's, T> = dyn FnMut(usize, &'s [T], &'s [T]) + 'a;

/// Storage of per-layer keys and values of sequences, in the run dtype.
///
/// Rows are `kv_dim = n_kv_heads · head_dim` wide; `seq` is the store's own sequence handle.
pub trait KvCache<T: Elem>: Sync {
    /// Stores K and V of position `pos` of `seq` in `layer` (overwrites if already there).
    fn write(&mut self, layer: usize, seq: usize, pos: usize, k: &[T], v: &[T]);
    /// Visits positions `0..len` of `seq` in `layer` in order, as runs of consecutive
    /// positions: `f(first_position, keys, values)` with `keys`/`values` = positions × kv_dim.
    fn read<'s>(&'s self, layer: usize, seq: usize, len: usize, f: &mut KvVisitor<'_, 's, T>);
}

/// One growable buffer per sequence and layer.
#[derive(Debug, Clone)]
pub struct ContiguousKv<T: Elem> {
    layers: usize,
    kv_dim: usize,
    // [seq][layer] → (keys, values), positions × kv_dim each.
    seqs: Vec<Vec<(Vec<T>, Vec<T>)>>,
}

impl<T: Elem> ContiguousKv<T> {
    /// An empty store for `layers` layers of width `kv_dim`.
    pub fn new(layers: usize, kv_dim: usize) -> Self {
        ContiguousKv {
            layers,
            kv_dim,
            seqs: Vec::new(),
        }
    }

    /// Positions stored for `seq` (in layer 0).
    pub fn len(&self, seq: usize) -> usize {
        self.seqs
            .get(seq)
            .map(|l| l[0].0.len() / self.kv_dim)
            .unwrap_or(0)
    }

    /// Whether no sequence holds any position.
    pub fn is_empty(&self) -> bool {
        (0..self.seqs.len()).all(|s| self.len(s) == 0)
    }

    /// Drops everything stored for `seq`.
    pub fn clear(&mut self, seq: usize) {
        if let Some(l) = self.seqs.get_mut(seq) {
            for (k, v) in l {
                k.clear();
                v.clear();
            }
        }
    }
}

impl<T: Elem> KvCache<T> for ContiguousKv<T> {
    fn write(&mut self, layer: usize, seq: usize, pos: usize, k: &[T], v: &[T]) {
        while self.seqs.len() <= seq {
            self.seqs.push(vec![(Vec::new(), Vec::new()); self.layers]);
        }
        let d = self.kv_dim;
        let (keys, values) = &mut self.seqs[seq][layer];
        let len = keys.len() / d;
        assert!(
            pos <= len,
            "kv write at position {pos} past the end ({len})"
        );
        if pos == len {
            keys.extend_from_slice(k);
            values.extend_from_slice(v);
        } else {
            keys[pos * d..(pos + 1) * d].copy_from_slice(k);
            values[pos * d..(pos + 1) * d].copy_from_slice(v);
        }
    }

    fn read<'s>(&'s self, layer: usize, seq: usize, len: usize, f: &mut KvVisitor<'_, 's, T>) {
        let d = self.kv_dim;
        let (keys, values) = &self.seqs[seq][layer];
        f(0, &keys[..len * d], &values[..len * d]);
    }
}

/// A minimal paged store: fixed-size blocks handed out in order, one block table per sequence.
#[derive(Debug, Clone)]
pub struct PagedKv<T: Elem> {
    layers: usize,
    kv_dim: usize,
    block_size: usize,
    // [block][layer] → (keys, values), block_size × kv_dim each.
    blocks: Vec<Vec<(Vec<T>, Vec<T>)>>,
    tables: Vec<Vec<usize>>,
}

impl<T: Elem> PagedKv<T> {
    /// An empty store with blocks of `block_size` positions.
    pub fn new(layers: usize, kv_dim: usize, block_size: usize) -> Self {
        assert!(block_size > 0);
        PagedKv {
            layers,
            kv_dim,
            block_size,
            blocks: Vec::new(),
            tables: Vec::new(),
        }
    }

    /// Block ids that hold `seq`'s positions, in order.
    pub fn block_table(&self, seq: usize) -> &[usize] {
        self.tables.get(seq).map(|t| t.as_slice()).unwrap_or(&[])
    }
}

impl<T: Elem> KvCache<T> for PagedKv<T> {
    fn write(&mut self, layer: usize, seq: usize, pos: usize, k: &[T], v: &[T]) {
        while self.tables.len() <= seq {
            self.tables.push(Vec::new());
        }
        let (b, off) = (pos / self.block_size, pos % self.block_size);
        while self.tables[seq].len() <= b {
            let cap = self.block_size * self.kv_dim;
            self.blocks.push(vec![
                (vec![T::default(); cap], vec![T::default(); cap]);
                self.layers
            ]);
            let id = self.blocks.len() - 1;
            self.tables[seq].push(id);
        }
        let d = self.kv_dim;
        let (keys, values) = &mut self.blocks[self.tables[seq][b]][layer];
        keys[off * d..(off + 1) * d].copy_from_slice(k);
        values[off * d..(off + 1) * d].copy_from_slice(v);
    }

    fn read<'s>(&'s self, layer: usize, seq: usize, len: usize, f: &mut KvVisitor<'_, 's, T>) {
        let d = self.kv_dim;
        let mut p = 0;
        for &b in &self.tables[seq] {
            if p >= len {
                break;
            }
            let n = self.block_size.min(len - p);
            let (keys, values) = &self.blocks[b][layer];
            f(p, &keys[..n * d], &values[..n * d]);
            p += n;
        }
    }
}
