//! Per-thread forward-pass scopes: "no gradient" (PyTorch's `no_grad` for the weights that
//! honour it: layers with trainable weights treat them as constants, so a forward pass run only
//! for its values keeps no autograd graph) and "adapters off" (LoRA layers compute as their
//! frozen base, the reference of a LoRA run's KL term). Sharded work carries both into its
//! threads ([`Scopes`]).

use std::cell::Cell;

thread_local! {
    static NO_GRAD: Cell<bool> = const { Cell::new(false) };
    static ADAPTERS_OFF: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` inside a no-gradient scope.
pub fn with_no_grad<T>(f: impl FnOnce() -> T) -> T {
    with_no_grad_if(true, f)
}

/// Runs `f` inside a no-gradient scope if `on` (else as this thread already is).
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

/// Runs `f` with every LoRA adapter switched off on this thread (and the shards it starts).
pub fn without_adapters<T>(f: impl FnOnce() -> T) -> T {
    let before = ADAPTERS_OFF.with(|d| d.replace(true));
    let out = f();
    ADAPTERS_OFF.with(|d| d.set(before));
    out
}

/// Whether LoRA adapters are switched off on this thread.
pub fn adapters_off() -> bool {
    ADAPTERS_OFF.with(Cell::get)
}

/// The scopes a thread is in, to carry into work handed to other threads.
#[derive(Debug, Clone, Copy)]
pub struct Scopes {
    no_grad: bool,
    adapters_off: bool,
}

impl Scopes {
    /// This thread's scopes.
    pub fn current() -> Self {
        Self { no_grad: no_grad(), adapters_off: adapters_off() }
    }

    /// Runs `f` inside these scopes (on top of this thread's own).
    pub fn enter<T>(self, f: impl FnOnce() -> T) -> T {
        with_no_grad_if(self.no_grad, || if self.adapters_off { without_adapters(f) } else { f() })
    }
}
