//! Placement hints for the large, long-lived buffers: the weights and the K/V pool.
//!
//! Decode streams every weight once per token and attention walks scattered K/V pages; with
//! 4 KiB pages both spend much of their time in TLB misses. On Linux, asking for transparent
//! huge pages (`MADV_HUGEPAGE`) before the memory is first touched removes most of them where
//! the system allows it (`/sys/kernel/mm/transparent_hugepage/enabled` = `madvise` or
//! `always`). Elsewhere, or when refused, nothing changes.

/// An empty vector with room for `n` values whose memory is advised for huge pages.
pub fn huge_capacity<T>(n: usize) -> Vec<T> {
    let v = Vec::with_capacity(n);
    advise_huge_pages(v.as_ptr() as *const u8, n * std::mem::size_of::<T>());
    v
}

/// A vector of `n` copies of `value` on memory advised for huge pages.
pub fn huge_vec<T: Clone>(n: usize, value: T) -> Vec<T> {
    let mut v = huge_capacity(n);
    v.resize(n, value);
    v
}

/// Advises the whole 2 MiB-aligned pages inside `[ptr, ptr + bytes)` for huge pages.
fn advise_huge_pages(ptr: *const u8, bytes: usize) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = (ptr as usize).div_ceil(HUGE) * HUGE;
        let end = (ptr as usize + bytes) / HUGE * HUGE;
        if end > start {
            // SAFETY: the range lies inside an allocation we own; madvise only changes how
            // the kernel backs it, never its contents. A refusal leaves 4 KiB pages.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_vectors_hold_what_was_asked() {
        let v = huge_vec(5 << 20, 7u16);
        assert_eq!(v.len(), 5 << 20);
        assert!(v.iter().all(|&x| x == 7));
        let mut w: Vec<f32> = huge_capacity(3);
        w.extend([1.0, 2.0, 3.0]);
        assert_eq!(w, [1.0, 2.0, 3.0]);
        assert!(huge_vec::<u8>(0, 1).is_empty());
    }
}
