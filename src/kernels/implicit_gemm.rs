//! Stride-1 convolutions as a few shifted matrix products over a padded channels-last copy of
//! the image ("implicit GEMM"): no column matrix is ever built.
//!
//! Store the image zero-padded to (Hp, Wp) and channels-last, items one after another. The
//! kw*C inputs that kernel row `ki` sees for output pixel (oy, ox) are then kw*C consecutive
//! floats, starting at padded pixel (oy + ki) * Wp + ox. Number the output pixels by the padded
//! pitch, r = oy * Wp + ox (the Wp - Wo extra pixels of each row, and the rows between items,
//! are computed and discarded): kernel row ki's inputs form a matrix A_ki whose row r starts
//! at padded pixel r + ki * Wp, a view with row stride C that gemm packs directly. So
//!
//!   out (r, O) = Σ_ki A_ki (r, kw*C) @ W_ki (kw*C, O),   W_ki[kj*C + c, o] = w[o, c, ki, kj]
//!
//! is kh gemm calls per group of items, at gemm's best orientation (many rows, K = kw*C deep).
//! Against im2col this saves writing and reading a column matrix kh*kw times the image.
//!
//! The batch goes through in groups of a few items, each small enough that its padded copy
//! and output rows stay in the L2 cache from the layout change (8x8 register transposes)
//! through the kh products and back to (N, O, Ho, Wo), instead of streaming every product's
//! output through main memory.
//!
//! Backward reuses the layout: the input gradient is the same convolution of the output
//! gradient (padded by k-1-pad) with the kernel flipped and its channels swapped, and the
//! weight gradient is Σ A_ki^T @ G per kernel row, G being the output gradient in the padded
//! row numbering with zeros in the discarded rows.

use std::mem::MaybeUninit;

use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use super::im2col::ConvGeom;
use super::simd::transpose;

/// Whether [`forward`], [`input_grad`] and [`weight_grad`] handle this geometry: stride 1, a
/// square kernel and padding that leaves the flipped kernel a non-negative padding.
pub fn supported(g: &ConvGeom) -> bool {
    g.stride == 1 && g.kh == g.kw && g.pad < g.kh
}

/// An image batch in the padded channels-last layout: `n` items of `hp * wp` pixels of `c`
/// floats, the image itself starting at pixel (pad, pad).
struct Padded {
    data: Vec<f32>,
    n: usize,
    c: usize,
    hp: usize,
    wp: usize,
}

impl Padded {
    /// Copies `src` (N, C, H, W) into an (N, hp, wp, C) buffer at offset (pad, pad), zeros
    /// around it (only the border is zeroed: the image overwrites the rest anyway).
    fn from_nchw(src: &[f32], (n, c, h, w): (usize, usize, usize, usize), pad: usize, (hp, wp): (usize, usize)) -> Self {
        debug_assert!(h + pad <= hp && w + pad <= wp);
        let len = n * hp * wp * c;
        let mut data = Vec::with_capacity(len);
        let item = hp * wp * c;
        if item > 0 {
            let zero = MaybeUninit::new(0f32);
            data.spare_capacity_mut()[..len]
                .par_chunks_mut(item)
                .enumerate()
                .for_each(|(i, dst)| {
                    let img = &src[i * c * h * w..][..c * h * w];
                    for (py, prow) in dst.chunks_exact_mut(wp * c).enumerate() {
                        if py < pad || py >= pad + h {
                            prow.fill(zero);
                            continue;
                        }
                        prow[..pad * c].fill(zero);
                        prow[(pad + w) * c..].fill(zero);
                        // Row y of the c planes, (c, w) with stride h*w, transposed into (w, c).
                        let y = py - pad;
                        transpose(&img[y * w..], h * w, &mut prow[pad * c..(pad + w) * c], c, c, w);
                    }
                });
        }
        // SAFETY: every padded row is either zero-filled or has its border zero-filled and its
        // w*c interior written, so all `len` elements are initialised (`len` is 0 if `item` is).
        unsafe { data.set_len(len) };
        Self { data, n, c, hp, wp }
    }

    /// Pixels per item.
    fn pixels(&self) -> usize {
        self.hp * self.wp
    }
}

/// Output rows to compute for a `k`x`k` convolution of all of `p`'s items: up to the last
/// valid pixel of the last item (reading its inputs ends exactly at the buffer's end).
fn rows(p: &Padded, k: usize) -> usize {
    let (ho, wo) = (p.hp + 1 - k, p.wp + 1 - k);
    (p.n - 1) * p.pixels() + (ho - 1) * p.wp + wo
}

/// Floats of padded image plus output rows that one group of items aims to keep in the L2
/// cache while its kh products run over them.
const GROUP_FLOATS: usize = 64 * 1024;

/// Items per group for images of `pixels` padded pixels with `floats` input plus output floats
/// per pixel, and the gemm parallelism inside each group: groups spread over rayon's threads,
/// or, when there are fewer groups than threads, one group at a time with gemm threaded.
///
/// Each group goes through layout change, products and layout change back while it is in
/// cache: converting the whole batch first made every kernel row's product stream its output
/// through main memory.
fn grouping(n: usize, pixels: usize, floats: usize) -> (usize, Parallelism) {
    let threads = rayon::current_num_threads().max(1);
    let group = (GROUP_FLOATS / (pixels * floats).max(1)).clamp(1, n.max(1));
    if n.div_ceil(group) >= threads || threads == 1 {
        (group, Parallelism::None)
    } else {
        (n.max(1), Parallelism::Rayon(threads))
    }
}

/// The kernel as kh stacked (kw*C, O) matrices: `out[ki][kj*C + c][o] = w[o][c][ki][kj]`, with
/// the taps flipped (ki -> k-1-ki, kj -> k-1-kj) when `flip`. `w` is (O, C, k, k).
fn kernel_rows(w: &[f32], o: usize, c: usize, k: usize, flip: bool) -> Vec<f32> {
    let mut out = vec![0f32; k * k * c * o];
    for oo in 0..o {
        for ch in 0..c {
            for ki in 0..k {
                for kj in 0..k {
                    let (si, sj) = if flip { (k - 1 - ki, k - 1 - kj) } else { (ki, kj) };
                    out[((ki * k + kj) * c + ch) * o + oo] = w[((oo * c + ch) * k + si) * k + sj];
                }
            }
        }
    }
    out
}

/// Swaps the kernel's channel axes: (O, C, k, k) -> (C, O, k, k).
fn swap_channels(w: &[f32], o: usize, c: usize, k: usize) -> Vec<f32> {
    let kk = k * k;
    let mut out = vec![0f32; w.len()];
    for oo in 0..o {
        for ch in 0..c {
            out[(ch * o + oo) * kk..][..kk].copy_from_slice(&w[(oo * c + ch) * kk..][..kk]);
        }
    }
    out
}

/// The convolution of `x` with `kernel_rows` (k, k*C, O), as (N, hp, wp, O) rows in the
/// padded numbering. Only the rows of valid output pixels are written (and may be read).
///
/// The rows stay channels-last: measured on the default UNet, a channel-major destination
/// (which gemm would not transpose internally) made both the forward pass and the training
/// step slower, since gemm then packs the image view across its row stride; so did a
/// channel-major image with one product per kernel tap (each only C deep).
fn conv_rows(x: &Padded, kr: &[f32], k: usize, o: usize, par: Parallelism) -> Vec<MaybeUninit<f32>> {
    let (c, wp) = (x.c, x.wp);
    let len = x.n * x.pixels() * o;
    let mut out = Vec::with_capacity(len);
    // SAFETY: MaybeUninit needs no initialisation.
    unsafe { out.set_len(len) };
    if o == 0 || x.n == 0 || c == 0 {
        // Nothing to compute (`convolve` answers zero channels with zeros before getting here).
        return out;
    }
    let m = rows(x, k);
    for ki in 0..k {
        // SAFETY: row r of A_ki reads k*c floats from pixel r + ki*wp; for r < m that ends at
        // most at the last pixel (see `rows`), and the kernel matrix and destination are sized
        // (k*c, o) and (m, o) within their buffers. The first call writes every destination
        // row below m; later ones add to them.
        unsafe {
            gemm(
                m, o, k * c,
                out.as_mut_ptr().cast::<f32>(), 1, o as isize,
                ki > 0,
                x.data.as_ptr().add(ki * wp * c), 1, c as isize,
                kr.as_ptr().add(ki * k * c * o), 1, o as isize,
                1.0, 1.0,
                false, false, false,
                par,
            );
        }
    }
    out
}

/// Gathers the valid pixels of [`conv_rows`]' (N, hp, wp, O) rows into `out`, an
/// (N, O, ho, wo) image.
fn rows_to_nchw(rows: &[MaybeUninit<f32>], out: &mut [MaybeUninit<f32>], o: usize, (hp, wp): (usize, usize), (ho, wo): (usize, usize)) {
    if o * ho * wo == 0 {
        return;
    }
    for (img, src) in out.chunks_exact_mut(o * ho * wo).zip(rows.chunks(hp * wp * o)) {
        for oy in 0..ho {
            let line = &src[oy * wp * o..][..wo * o];
            // SAFETY: pixels (oy, ox < wo) are valid outputs, rows `conv_rows` wrote.
            let line = unsafe { std::slice::from_raw_parts(line.as_ptr().cast::<f32>(), line.len()) };
            // (wo, o) pixels-by-channels into the o maps' row oy, stride ho*wo.
            transpose(line, o, &mut img[oy * wo..], ho * wo, wo, o);
        }
    }
}

/// The stride-1 convolution of `src` (N, C, H, W), zero-padded by `pad`, with `kr` ([`kernel_rows`]
/// of an (O, C, k, k) kernel): (N, O, H + 2 pad + 1 - k, W + 2 pad + 1 - k), one item group
/// at a time.
fn convolve(src: &[f32], (n, c, h, w): (usize, usize, usize, usize), pad: usize, kr: &[f32], k: usize, o: usize) -> Vec<f32> {
    let (hp, wp) = (h + 2 * pad, w + 2 * pad);
    let (ho, wo) = (hp + 1 - k, wp + 1 - k);
    let len = n * o * ho * wo;
    if c * h * w == 0 {
        // No input values: every output is a sum over nothing (or over padding zeros).
        return vec![0f32; len];
    }
    let mut out = Vec::with_capacity(len);
    if len > 0 {
        let (group, par) = grouping(n, hp * wp, c + o);
        out.spare_capacity_mut()[..len]
            .par_chunks_mut(group * o * ho * wo)
            .zip(src.par_chunks(group * c * h * w).with_min_len(1))
            .for_each(|(dst, xs)| {
                let items = dst.len() / (o * ho * wo);
                let xp = Padded::from_nchw(xs, (items, c, h, w), pad, (hp, wp));
                rows_to_nchw(&conv_rows(&xp, kr, k, o, par), dst, o, (hp, wp), (ho, wo));
            });
    }
    // SAFETY: each of the n images' o*ho*wo elements was written by `rows_to_nchw`.
    unsafe { out.set_len(len) };
    out
}

/// The convolution of the contiguous image `x` (N, C, H, W) with `w` (O, C, k, k): (N, O, Ho, Wo).
pub fn forward(g: &ConvGeom, o: usize, x: &[f32], w: &[f32]) -> Vec<f32> {
    debug_assert!(supported(g));
    let k = g.kh;
    convolve(x, (g.n, g.c, g.h, g.w), g.pad, &kernel_rows(w, o, g.c, k, false), k, o)
}

/// The input gradient (N, C, H, W) given the output gradient `grad` (N, O, Ho, Wo): the
/// convolution of `grad`, padded by k-1-pad, with the flipped kernel (C, O, k, k).
pub fn input_grad(g: &ConvGeom, o: usize, grad: &[f32], w: &[f32]) -> Vec<f32> {
    debug_assert!(supported(g));
    let k = g.kh;
    let flipped = kernel_rows(&swap_channels(w, o, g.c, k), g.c, o, k, true);
    convolve(grad, (g.n, o, g.ho, g.wo), k - 1 - g.pad, &flipped, k, g.c)
}

/// The weight gradient (O, C, k, k) given the input `x` (N, C, H, W) and the output gradient
/// `grad` (N, O, Ho, Wo): Σ_ki A_ki^T @ G per chunk of items, the chunks' sums added up.
pub fn weight_grad(g: &ConvGeom, o: usize, x: &[f32], grad: &[f32]) -> Vec<f32> {
    debug_assert!(supported(g));
    let (k, c) = (g.kh, g.c);
    let (hp, wp) = (g.h + 2 * g.pad, g.w + 2 * g.pad);
    let len = k * k * c * o;
    if g.n * g.h * g.w * g.ho * g.wo == 0 || len == 0 {
        return vec![0f32; len];
    }
    let (group, par) = grouping(g.n, hp * wp, c + o);
    let dw_rows = x
        .par_chunks(group * c * g.h * g.w)
        .zip(grad.par_chunks(group * o * g.ho * g.wo))
        .fold(
            || vec![0f32; len],
            |mut acc, (xs, gs)| {
                let items = xs.len() / (c * g.h * g.w);
                let xp = Padded::from_nchw(xs, (items, c, g.h, g.w), g.pad, (hp, wp));
                // The output gradient in the same row numbering: pixel (oy, ox) at row oy*wp + ox.
                let gp = Padded::from_nchw(gs, (items, o, g.ho, g.wo), 0, (hp, wp));
                let m = rows(&xp, k);
                for ki in 0..k {
                    // SAFETY: A_ki^T (k*c, m) reads the same in-bounds pixels as the forward
                    // pass; G is (m, o) within `gp`; the destination is (k*c, o) within `acc`.
                    unsafe {
                        gemm(
                            k * c, o, m,
                            acc.as_mut_ptr().add(ki * k * c * o), 1, o as isize,
                            true,
                            xp.data.as_ptr().add(ki * wp * c), c as isize, 1,
                            gp.data.as_ptr(), 1, o as isize,
                            1.0, 1.0,
                            false, false, false,
                            par,
                        );
                    }
                }
                acc
            },
        )
        .reduce_with(|mut a, b| {
            a.iter_mut().zip(&b).for_each(|(x, &y)| *x += y);
            a
        })
        .unwrap_or_else(|| vec![0f32; len]);
    // (ki, kj, c, o) -> (o, c, ki, kj).
    let mut dw = vec![0f32; len];
    for tap in 0..k * k {
        for ch in 0..c {
            for oo in 0..o {
                dw[(oo * c + ch) * k * k + tap] = dw_rows[(tap * c + ch) * o + oo];
            }
        }
    }
    dw
}
