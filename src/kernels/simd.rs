//! Runtime choice of wider vector instructions for the elementwise kernels.
//!
//! The crate is built for baseline x86-64 (SSE2, 4 lanes). The fused softmax and GEGLU loops
//! are plain Rust written to vectorise; compiling a copy of them with AVX2 + FMA enabled
//! (8 lanes) and picking it at run time when the CPU has those features roughly halves their
//! cost without changing the build for every other machine. Rust never contracts `a * b + c`
//! into an FMA by itself, so both copies round identically.

/// Whether the CPU running us has AVX2 and FMA (cached by the standard library).
#[inline]
pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Defines `$name` calling the `#[inline(always)]` function `$generic` with the same
/// arguments, through a copy compiled with AVX2 + FMA when [`has_avx2_fma`] says so.
macro_rules! dispatch_avx2 {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) => $generic:path) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn wide($($arg: $ty),*) {
                    $generic($($arg),*)
                }
                if $crate::kernels::simd::has_avx2_fma() {
                    // SAFETY: `wide` only needs AVX2 and FMA, which were just detected.
                    return unsafe { wide($($arg),*) };
                }
            }
            $generic($($arg),*)
        }
    };
}
pub(crate) use dispatch_avx2;

/// Whether the CPU running us has AVX (cached by the standard library).
#[inline]
fn has_avx() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Writes the transpose of the `rows` x `cols` matrix `src` (row stride `ss`) into `dst` (row
/// stride `ds`): `dst[j * ds + i] = src[i * ss + j]`.
///
/// The convolution's layout changes are transposes of channel and pixel axes; element by
/// element, every write (or read) lands on a different cache line. With AVX the bulk goes in
/// 8x8 tiles, eight row loads and eight row stores each, shuffled in registers.
pub(crate) fn transpose(src: &[f32], ss: usize, dst: &mut [std::mem::MaybeUninit<f32>], ds: usize, rows: usize, cols: usize) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!((rows - 1) * ss + cols <= src.len(), "transpose: source too short");
    assert!((cols - 1) * ds + rows <= dst.len(), "transpose: destination too short");
    let (r8, c8) = if has_avx() { (rows / 8 * 8, cols / 8 * 8) } else { (0, 0) };
    #[cfg(target_arch = "x86_64")]
    for i in (0..r8).step_by(8) {
        for j in (0..c8).step_by(8) {
            // SAFETY: AVX was detected; the tile's reads end at src[(i+7)*ss + j+7] and its
            // writes at dst[(j+7)*ds + i+7], inside both slices by the asserts above.
            unsafe { transpose8x8(src.as_ptr().add(i * ss + j), ss, dst.as_mut_ptr().add(j * ds + i).cast(), ds) };
        }
    }
    for i in 0..rows {
        let from = if i < r8 { c8 } else { 0 };
        for j in from..cols {
            dst[j * ds + i].write(src[i * ss + j]);
        }
    }
}

/// One 8x8 tile of [`transpose`]: unpack pairs, shuffle quads, swap 128-bit halves.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn transpose8x8(src: *const f32, ss: usize, dst: *mut f32, ds: usize) {
    use std::arch::x86_64::*;
    // Written out: closures would not inherit the target feature, and the intrinsics would not inline.
    let r0 = _mm256_loadu_ps(src);
    let r1 = _mm256_loadu_ps(src.add(ss));
    let r2 = _mm256_loadu_ps(src.add(2 * ss));
    let r3 = _mm256_loadu_ps(src.add(3 * ss));
    let r4 = _mm256_loadu_ps(src.add(4 * ss));
    let r5 = _mm256_loadu_ps(src.add(5 * ss));
    let r6 = _mm256_loadu_ps(src.add(6 * ss));
    let r7 = _mm256_loadu_ps(src.add(7 * ss));
    let (t0, t1) = (_mm256_unpacklo_ps(r0, r1), _mm256_unpackhi_ps(r0, r1));
    let (t2, t3) = (_mm256_unpacklo_ps(r2, r3), _mm256_unpackhi_ps(r2, r3));
    let (t4, t5) = (_mm256_unpacklo_ps(r4, r5), _mm256_unpackhi_ps(r4, r5));
    let (t6, t7) = (_mm256_unpacklo_ps(r6, r7), _mm256_unpackhi_ps(r6, r7));
    // s_q holds columns q and q + 4 of rows 0-3 (one per 128-bit half); s_{q+4} of rows 4-7.
    let (s0, s1) = (_mm256_shuffle_ps::<0x44>(t0, t2), _mm256_shuffle_ps::<0xEE>(t0, t2));
    let (s2, s3) = (_mm256_shuffle_ps::<0x44>(t1, t3), _mm256_shuffle_ps::<0xEE>(t1, t3));
    let (s4, s5) = (_mm256_shuffle_ps::<0x44>(t4, t6), _mm256_shuffle_ps::<0xEE>(t4, t6));
    let (s6, s7) = (_mm256_shuffle_ps::<0x44>(t5, t7), _mm256_shuffle_ps::<0xEE>(t5, t7));
    _mm256_storeu_ps(dst, _mm256_permute2f128_ps::<0x20>(s0, s4));
    _mm256_storeu_ps(dst.add(ds), _mm256_permute2f128_ps::<0x20>(s1, s5));
    _mm256_storeu_ps(dst.add(2 * ds), _mm256_permute2f128_ps::<0x20>(s2, s6));
    _mm256_storeu_ps(dst.add(3 * ds), _mm256_permute2f128_ps::<0x20>(s3, s7));
    _mm256_storeu_ps(dst.add(4 * ds), _mm256_permute2f128_ps::<0x31>(s0, s4));
    _mm256_storeu_ps(dst.add(5 * ds), _mm256_permute2f128_ps::<0x31>(s1, s5));
    _mm256_storeu_ps(dst.add(6 * ds), _mm256_permute2f128_ps::<0x31>(s2, s6));
    _mm256_storeu_ps(dst.add(7 * ds), _mm256_permute2f128_ps::<0x31>(s3, s7));
}

#[cfg(test)]
mod tests {
    #[test]
    fn transpose_matches_the_definition_at_tile_edges() {
        for (rows, cols) in [(1, 1), (8, 8), (16, 24), (9, 17), (3, 40), (33, 5)] {
            let (ss, ds) = (cols + 3, rows + 2);
            let src: Vec<f32> = (0..rows * ss).map(|v| v as f32).collect();
            let mut dst = vec![std::mem::MaybeUninit::new(-1f32); cols * ds];
            super::transpose(&src, ss, &mut dst, ds, rows, cols);
            for i in 0..rows {
                for j in 0..cols {
                    assert_eq!(unsafe { dst[j * ds + i].assume_init() }, src[i * ss + j], "({i}, {j}) of {rows}x{cols}");
                }
            }
        }
    }
}
