//! The im2col / col2im pair of custom ops behind the CPU convolution.
//!
//! `Im2Col` unfolds an (N, C, H, W) image into columns laid out as (N, C*kh*kw, Ho*Wo): row
//! `(c, ki, kj)` of batch `n` holds, for every output pixel in row-major order, the input pixel
//! that kernel tap `(ki, kj)` of channel `c` sees (zero in the padding). That layout makes the
//! weight reshaped to (O, C*kh*kw) times the columns equal the (N, O, Ho*Wo) output directly,
//! with no transpose. `Col2Im` is its adjoint (a scatter-add back into the image), so each op
//! is the other's backward pass and candle's autograd needs nothing else from us.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Static geometry of one convolution: image, kernel, stride, padding and output size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeom {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
    pub ho: usize,
    pub wo: usize,
}

impl ConvGeom {
    /// Validates the geometry and derives the output size; errors name the offending shape.
    pub fn new(
        (n, c, h, w): (usize, usize, usize, usize),
        (kh, kw): (usize, usize),
        stride: usize,
        pad: usize,
    ) -> Result<Self> {
        if stride == 0 {
            bail!("conv2d: stride must be positive, got 0");
        }
        if kh == 0 || kw == 0 {
            bail!("conv2d: empty kernel {kh}x{kw}");
        }
        let (hp, wp) = (h + 2 * pad, w + 2 * pad);
        if hp < kh || wp < kw {
            bail!(
                "conv2d: kernel {kh}x{kw} larger than padded input {hp}x{wp} \
                 (input {n}x{c}x{h}x{w}, padding {pad})"
            );
        }
        let ho = (hp - kh) / stride + 1;
        let wo = (wp - kw) / stride + 1;
        Ok(Self {
            n,
            c,
            h,
            w,
            kh,
            kw,
            stride,
            pad,
            ho,
            wo,
        })
    }

    /// Number of rows of one batch item's column matrix: C * kh * kw.
    pub fn k(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// Number of output pixels per batch item: Ho * Wo.
    pub fn p(&self) -> usize {
        self.ho * self.wo
    }

    pub(crate) fn image_shape(&self) -> Shape {
        (self.n, self.c, self.h, self.w).into()
    }

    pub(crate) fn cols_shape(&self) -> Shape {
        (self.n, self.k(), self.p()).into()
    }

    /// For kernel offset `kj`, the output columns `[lo, hi)` whose input column
    /// `ox * stride + kj - pad` lies inside the image; the rest read padding.
    fn valid_range(&self, kj: usize, in_len: usize, out_len: usize) -> (usize, usize) {
        // ix = ox*s + kj - pad >= 0  <=>  ox >= ceil((pad - kj) / s)
        let lo = if kj >= self.pad {
            0
        } else {
            (self.pad - kj).div_ceil(self.stride)
        };
        // ix <= in_len - 1  <=>  ox <= (in_len - 1 + pad - kj) / s
        let hi = if in_len + self.pad > kj {
            ((in_len - 1 + self.pad - kj) / self.stride + 1).min(out_len)
        } else {
            0
        };
        (lo.min(hi), hi)
    }
}

/// Borrows the f32 data of a contiguous CPU tensor with exactly `expected` shape.
pub(crate) fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    expected: &Shape,
    op: &str,
) -> Result<&'a [f32]> {
    if layout.shape() != expected {
        bail!(
            "{op}: expected input of shape {expected:?}, got {:?}",
            layout.shape()
        );
    }
    let data = match storage {
        CpuStorage::F32(data) => data.as_slice(),
        other => bail!("{op}: only f32 is supported, got {:?}", other.dtype()),
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!(
            "{op}: input of shape {:?} is not contiguous",
            layout.shape()
        ),
    }
}

/// Unfolds an image (N, C, H, W) into columns (N, C*kh*kw, Ho*Wo).
#[derive(Debug, Clone, Copy)]
pub struct Im2Col(pub ConvGeom);

/// Scatter-adds columns (N, C*kh*kw, Ho*Wo) back into an image (N, C, H, W); the adjoint of
/// [`Im2Col`].
#[derive(Debug, Clone, Copy)]
pub struct Col2Im(pub ConvGeom);

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = &self.0;
        let src = contiguous_f32(storage, layout, &g.image_shape(), "im2col")?;
        Ok((CpuStorage::F32(im2col_vec(g, src)), g.cols_shape()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.contiguous()?.apply_op1(Col2Im(self.0))?))
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = &self.0;
        let src = contiguous_f32(storage, layout, &g.cols_shape(), "col2im")?;
        let mut dst = vec![0f32; g.n * g.c * g.h * g.w];
        col2im(g, src, &mut dst);
        Ok((CpuStorage::F32(dst), g.image_shape()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.contiguous()?.apply_op1(Im2Col(self.0))?))
    }
}

/// The columns (N, C*kh*kw, Ho*Wo) of the contiguous image `src` (N, C, H, W), in a new buffer.
pub fn im2col_vec(g: &ConvGeom, src: &[f32]) -> Vec<f32> {
    // Every element is written (padding included), so skip the zeroing pass.
    let len = g.n * g.k() * g.p();
    let mut dst = Vec::with_capacity(len);
    im2col(g, src, &mut dst.spare_capacity_mut()[..len]);
    // SAFETY: `im2col` initialised all `len` elements.
    unsafe { dst.set_len(len) };
    dst
}

/// Fills every element of `dst` (N, C*kh*kw, Ho*Wo) from the contiguous image `src`
/// (N, C, H, W), padding with zeros.
///
/// One rayon task per (n, c) plane: it writes the kh*kw column rows of that channel, which are
/// adjacent in `dst`, so tasks never share output memory.
pub fn im2col(g: &ConvGeom, src: &[f32], dst: &mut [MaybeUninit<f32>]) {
    let plane = g.h * g.w;
    let rows_per_plane = g.kh * g.kw * g.p();
    if rows_per_plane == 0 || plane == 0 {
        return;
    }
    dst.par_chunks_mut(rows_per_plane)
        .zip(src.par_chunks(plane))
        .for_each(|(cols, img)| im2col_plane(g, img, cols));
}

/// Unfolds one (H, W) plane into its kh*kw column rows of length Ho*Wo each.
fn im2col_plane(g: &ConvGeom, img: &[f32], cols: &mut [MaybeUninit<f32>]) {
    let p = g.p();
    for ki in 0..g.kh {
        for kj in 0..g.kw {
            let row = &mut cols[(ki * g.kw + kj) * p..][..p];
            let (lo, hi) = g.valid_range(kj, g.w, g.wo);
            for (oy, out) in row.chunks_exact_mut(g.wo).enumerate() {
                let iy = (oy * g.stride + ki) as isize - g.pad as isize;
                if iy < 0 || iy >= g.h as isize {
                    out.fill(MaybeUninit::new(0.0));
                    continue;
                }
                let line = &img[iy as usize * g.w..][..g.w];
                out[..lo].fill(MaybeUninit::new(0.0));
                out[hi..].fill(MaybeUninit::new(0.0));
                if lo < hi {
                    // First input column read by this row segment; in range by construction.
                    let ix0 = lo * g.stride + kj - g.pad;
                    gather_row(&mut out[lo..hi], &line[ix0..], g.stride);
                }
            }
        }
    }
}

/// `out[i] = line[i * stride]`, as a straight copy when the stride is 1.
#[inline]
fn gather_row(out: &mut [MaybeUninit<f32>], line: &[f32], stride: usize) {
    if stride == 1 {
        out.write_copy_of_slice(&line[..out.len()]);
    } else {
        for (o, v) in out.iter_mut().zip(line.iter().step_by(stride)) {
            o.write(*v);
        }
    }
}

/// Accumulates `src` (N, C*kh*kw, Ho*Wo) into the zeroed image `dst` (N, C, H, W).
///
/// One rayon task per (n, c) plane: every contribution to a plane comes from the kh*kw column
/// rows of that same channel, so the scatter-add needs no synchronisation.
pub fn col2im(g: &ConvGeom, src: &[f32], dst: &mut [f32]) {
    let plane = g.h * g.w;
    let rows_per_plane = g.kh * g.kw * g.p();
    if rows_per_plane == 0 || plane == 0 {
        return;
    }
    dst.par_chunks_mut(plane)
        .zip(src.par_chunks(rows_per_plane))
        .for_each(|(img, cols)| col2im_plane(g, cols, img));
}

/// Scatter-adds the kh*kw column rows of one channel into its (H, W) plane.
fn col2im_plane(g: &ConvGeom, cols: &[f32], img: &mut [f32]) {
    let p = g.p();
    for ki in 0..g.kh {
        for kj in 0..g.kw {
            let row = &cols[(ki * g.kw + kj) * p..][..p];
            let (lo, hi) = g.valid_range(kj, g.w, g.wo);
            if lo >= hi {
                continue;
            }
            let ix0 = lo * g.stride + kj - g.pad;
            for (oy, inp) in row.chunks_exact(g.wo).enumerate() {
                let iy = (oy * g.stride + ki) as isize - g.pad as isize;
                if iy < 0 || iy >= g.h as isize {
                    continue;
                }
                let line = &mut img[iy as usize * g.w..][..g.w];
                scatter_add_row(&mut line[ix0..], &inp[lo..hi], g.stride);
            }
        }
    }
}

/// `line[i * stride] += vals[i]`, as a straight vector add when the stride is 1.
#[inline]
fn scatter_add_row(line: &mut [f32], vals: &[f32], stride: usize) {
    if stride == 1 {
        for (l, v) in line[..vals.len()].iter_mut().zip(vals) {
            *l += *v;
        }
    } else {
        for (l, v) in line.iter_mut().step_by(stride).zip(vals) {
            *l += *v;
        }
    }
}
