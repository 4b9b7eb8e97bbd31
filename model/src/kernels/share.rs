//! Output columns shared out over a call's threads: an even contiguous share each, with the
//! tail of a slower thread's share taken over by threads that finish first.
//!
//! Each thread walks its own share front to back in small pieces, so its weights stay one
//! forward stream for the prefetchers. A thread whose share is done takes the back half of
//! the largest share still open and walks that. Which thread computes a column never changes
//! its bits: every column is one whole reduction on one thread.

use std::sync::atomic::{AtomicU64, Ordering};

/// Threads a [`Shares`] can track; calls on more threads hand out whole even shares.
pub const MAX_THREADS: usize = 16;

/// One thread's open columns `[next, end)`, packed in one word so a claim and a takeover
/// cannot both get the same column; on a cache line of its own, so the owner's claims stay in
/// its cache until another thread comes to take from it.
#[repr(align(64))]
struct Share(AtomicU64);

fn pack(next: usize, end: usize) -> u64 {
    ((next as u64) << 32) | end as u64
}

fn unpack(v: u64) -> (usize, usize) {
    ((v >> 32) as usize, (v & 0xffff_ffff) as usize)
}

/// The columns `0..total` of one call, shared over `threads` threads.
pub struct Shares {
    shares: [Share; MAX_THREADS],
    threads: usize,
    piece: usize,
    align: usize,
}

impl Shares {
    /// Even shares of `total` columns (whole multiples of `align`, the last one shorter),
    /// handed out `piece` columns at a time (rounded up to `align`). With more than
    /// [`MAX_THREADS`] threads, each call hands out one whole even share.
    pub fn new(total: usize, threads: usize, piece: usize, align: usize) -> Self {
        assert!(total < 1 << 32, "too many output columns: {total}");
        let align = align.max(1);
        let threads = threads.max(1);
        let share = total.div_ceil(threads).div_ceil(align) * align;
        let tracked = threads <= MAX_THREADS;
        // Untracked, all columns sit in the first slot and every thread claims a whole
        // share from there.
        let shares = std::array::from_fn(|t| {
            let (a, b) = match tracked {
                true => ((t * share).min(total), ((t + 1) * share).min(total)),
                false => (0, if t == 0 { total } else { 0 }),
            };
            Share(AtomicU64::new(if t < threads { pack(a, b) } else { 0 }))
        });
        Shares {
            shares,
            threads,
            piece: match tracked {
                true => piece.max(1).div_ceil(align) * align,
                false => share.max(1),
            },
            align,
        }
    }

    /// Whether each thread has a share of its own (at most [`MAX_THREADS`] threads).
    fn tracked(&self) -> bool {
        self.threads <= MAX_THREADS
    }

    /// The next columns for thread `t`, or `None` when nothing is left for it.
    pub fn next(&self, t: usize) -> Option<std::ops::Range<usize>> {
        let own = if self.tracked() { t } else { 0 };
        loop {
            if let Some(r) = self.claim(own) {
                return Some(r);
            }
            if !self.tracked() || !self.take_from_others(t) {
                return None;
            }
        }
    }

    /// Up to `piece` columns from the front of thread `t`'s own share.
    fn claim(&self, t: usize) -> Option<std::ops::Range<usize>> {
        let slot = &self.shares[t].0;
        let mut cur = slot.load(Ordering::Relaxed);
        loop {
            let (next, end) = unpack(cur);
            if next >= end {
                return None;
            }
            let to = (next + self.piece).min(end);
            match slot.compare_exchange_weak(
                cur,
                pack(to, end),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(next..to),
                Err(v) => cur = v,
            }
        }
    }

    /// Moves the back half of the largest open share (if at least two pieces are left there)
    /// into thread `t`'s empty share; says whether it did.
    fn take_from_others(&self, t: usize) -> bool {
        loop {
            // (thread, its packed share, columns left there)
            let mut best: Option<(usize, u64, usize)> = None;
            for v in (0..self.threads).filter(|&v| v != t) {
                let cur = self.shares[v].0.load(Ordering::Relaxed);
                let (next, end) = unpack(cur);
                let left = end.saturating_sub(next);
                if left >= 2 * self.piece && best.is_none_or(|(_, _, most)| left > most) {
                    best = Some((v, cur, left));
                }
            }
            let Some((v, cur, _)) = best else {
                return false;
            };
            let (next, end) = unpack(cur);
            let mid = (next + (end - next) / 2).div_ceil(self.align) * self.align;
            if mid >= end {
                return false;
            }
            if self.shares[v]
                .0
                .compare_exchange(cur, pack(next, mid), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                // Our own share is empty, and an empty share is never taken from, so
                // nothing else writes it now.
                self.shares[t].0.store(pack(mid, end), Ordering::Relaxed);
                return true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Every column handed out, per thread, checking each range's alignment on the way.
    fn drain(shares: &Shares, t: usize, align: usize, total: usize) -> Vec<std::ops::Range<usize>> {
        let mut got = Vec::new();
        while let Some(r) = shares.next(t) {
            assert!(r.start < r.end && r.end <= total, "{r:?}");
            assert!(r.start % align == 0, "range {r:?} not aligned to {align}");
            got.push(r);
        }
        got
    }

    fn covered_once(ranges: &[std::ops::Range<usize>], total: usize) {
        let mut hits = vec![0u8; total];
        for r in ranges {
            for c in r.clone() {
                hits[c] += 1;
            }
        }
        assert!(
            hits.iter().all(|&h| h == 1),
            "columns not covered exactly once"
        );
    }

    #[test]
    fn each_thread_walks_its_even_share_in_order() {
        let (total, threads, piece, align) = (100, 3, 7, 6);
        let shares = Shares::new(total, threads, piece, align);
        // share = ceil(100/3) = 34 → 36 columns; pieces of 12. Threads taking turns finish
        // together, so none takes over another's columns.
        let mut got = vec![Vec::new(); threads];
        let mut open = true;
        while open {
            open = false;
            for (t, g) in got.iter_mut().enumerate() {
                if let Some(r) = shares.next(t) {
                    assert_eq!(r.start % align, 0);
                    g.push(r);
                    open = true;
                }
            }
        }
        assert_eq!(got[0], vec![0..12, 12..24, 24..36]);
        assert_eq!(got[1], vec![36..48, 48..60, 60..72]);
        assert_eq!(got[2], vec![72..84, 84..96, 96..100]);
    }

    #[test]
    fn a_finished_thread_takes_the_back_half_of_a_slower_share() {
        let (total, piece, align) = (240, 12, 6);
        let shares = Shares::new(total, 2, piece, align);
        // Thread 1 has not started: thread 0 does its share, then halves of what is left of
        // thread 1's, until less than two pieces are left there.
        let mine = drain(&shares, 0, align, total);
        let theirs = drain(&shares, 1, align, total);
        let done0: usize = mine.iter().map(|r| r.len()).sum();
        assert_eq!(
            mine[..10].iter().map(|r| r.start).collect::<Vec<_>>(),
            (0..120).step_by(12).collect::<Vec<_>>()
        );
        assert_eq!(mine[10], 180..192, "first takeover: back half of 120..240");
        assert!(done0 > 200, "thread 0 did only {done0} of 240");
        assert_eq!(theirs.first().map(|r| r.start), Some(120));
        let all: Vec<_> = mine.iter().chain(&theirs).cloned().collect();
        covered_once(&all, total);
    }

    #[test]
    fn concurrent_threads_cover_every_column_once() {
        for (total, threads, piece) in [
            (49152, 2, 57),
            (960, 2, 60),
            (577, 3, 6),
            (5, 4, 6),
            (0, 2, 6),
        ] {
            for round in 0..20 {
                let shares = Shares::new(total, threads, piece, 6);
                let slow = AtomicUsize::new(round % threads);
                let got: Vec<Vec<std::ops::Range<usize>>> = std::thread::scope(|s| {
                    let hs: Vec<_> = (0..threads)
                        .map(|t| {
                            let (shares, slow) = (&shares, &slow);
                            s.spawn(move || {
                                let mut got = Vec::new();
                                while let Some(r) = shares.next(t) {
                                    // One thread lags, so takeovers race with its claims.
                                    if t == slow.load(Ordering::Relaxed) {
                                        std::thread::yield_now();
                                    }
                                    got.push(r);
                                }
                                got
                            })
                        })
                        .collect();
                    hs.into_iter().map(|h| h.join().unwrap()).collect()
                });
                covered_once(&got.concat(), total);
            }
        }
    }

    #[test]
    fn more_threads_than_tracked_get_whole_shares() {
        let (total, threads) = (1000, MAX_THREADS + 4);
        let shares = Shares::new(total, threads, 6, 6);
        let got: Vec<_> = (0..threads)
            .flat_map(|t| drain(&shares, t, 6, total))
            .collect();
        assert!(
            got.iter().all(|r| r.len() == 54 || r.end == total),
            "{got:?}"
        );
        covered_once(&got, total);
    }
}
