//! A per-thread "no gradient" scope (PyTorch's `no_grad` for the weights that honour it): layers
//! with trainable weights read it and treat those weights as constants, so a forward pass run
//! only for its values (sampling) keeps no autograd graph. Sharded work carries it into its threads.

use std::cell::Cell;

thread_local! {
    static NO_GRAD: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` inside a no-gradient scope.
pub fn with_no_grad<T>(f: impl FnOnce() -> T) -> T {
    with_no_grad_if(true, f)
}

/// Runs `f` inside a no-gradient scope if `on` (else as this thread already is): how work handed
/// to another thread keeps the caller's setting.
pub fn with_no_grad_if<T>(on: bool, f: impl FnOnce() -> T) -> T {
    let before = NO_GRAD.with(|d| d.replace(on || d.get()));
    let out = f();
    NO_GRAD.with(|d| d.set(before));
    out
}

/// Whether this thread is inside a no-gradient scope.
pub fn no_grad() -> bool {
    NO_GRAD.with(Cell::get)
}
