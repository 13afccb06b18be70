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
