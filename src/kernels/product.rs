//! A bounds-checked matrix product on plain slices, over gemm: the one place where the linear
//! layer and the batched attention products call it (the implicit-GEMM convolution calls gemm
//! directly, on overlapping views of one buffer).

use gemm::{gemm, Parallelism};

/// `dst (m, n), row-major = [dst +] lhs @ rhs`, each operand given as a slice with its (row,
/// column) strides in floats, so that transposed operands are read in place.
pub(crate) struct Product<'a> {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lhs: (&'a [f32], usize, usize),
    pub rhs: (&'a [f32], usize, usize),
}

impl Product<'_> {
    /// Writes (or, with `accumulate`, adds) the product into `dst`, on rayon's threads when
    /// `threaded` (as candle's matmul does), else on the calling thread.
    pub fn run(&self, dst: &mut [f32], accumulate: bool, threaded: bool) {
        let (lhs, lrs, lcs) = self.lhs;
        let (rhs, rrs, rcs) = self.rhs;
        if self.m * self.n == 0 {
            return;
        }
        if self.k == 0 {
            if !accumulate {
                dst[..self.m * self.n].fill(0.0);
            }
            return;
        }
        assert!(dst.len() >= self.m * self.n, "product: destination too small");
        assert!(lhs.len() > (self.m - 1) * lrs + (self.k - 1) * lcs, "product: lhs too small");
        assert!(rhs.len() > (self.k - 1) * rrs + (self.n - 1) * rcs, "product: rhs too small");
        let parallelism = match rayon::current_num_threads() {
            n if threaded && n > 1 => Parallelism::Rayon(n),
            _ => Parallelism::None,
        };
        // SAFETY: the asserts above keep every element gemm touches inside the three slices.
        unsafe {
            gemm(
                self.m, self.n, self.k,
                dst.as_mut_ptr(), 1, self.n as isize,
                accumulate,
                lhs.as_ptr(), lcs as isize, lrs as isize,
                rhs.as_ptr(), rcs as isize, rrs as isize,
                1.0, 1.0,
                false, false, false,
                parallelism,
            );
        }
    }
}
