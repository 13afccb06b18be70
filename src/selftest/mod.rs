//! `ddpo selftest`: the golden checks, recomputed on any device in any weight dtype. The tiny
//! Stable Diffusion fixture ([`sd`]) checks our UNet, text encoder, VAE, DDIM step and a whole
//! trajectory against diffusers / transformers / ddpo-pytorch; the shipped model's reference
//! outputs ([`shapes`]) check that this build and device reproduce what CPU f32 computed.
//! The golden tests call these same checks, so there is one implementation of each comparison.

pub mod sd;
pub mod shapes;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device, Tensor};

use crate::family::WeightDtype;

/// What `run` checks, and where.
#[derive(Debug, Clone)]
pub struct SelftestOptions {
    pub device: Device,
    pub dtype: WeightDtype,
    /// The folder holding `tiny-sd/` and `shapes-golden/` (the checkout's `tests/fixtures`).
    pub fixtures: PathBuf,
    /// The shipped model whose reference outputs `shapes-golden/` holds.
    pub shapes_model: PathBuf,
}

/// One check's outcome: its largest absolute error against the reference, or the error that
/// stopped it.
#[derive(Debug, Clone)]
pub struct CheckResult {
    pub name: String,
    pub max_error: Option<f32>,
    pub tolerance: f32,
    pub failure: Option<String>,
}

impl CheckResult {
    pub fn passed(&self) -> bool {
        self.failure.is_none() && self.max_error.is_some_and(|e| e <= self.tolerance)
    }
}

impl std::fmt::Display for CheckResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verdict = if self.passed() { "pass" } else { "FAIL" };
        match (&self.failure, self.max_error) {
            (Some(why), _) => write!(f, "{verdict}  {:<30} error: {why}", self.name),
            (None, Some(e)) => write!(f, "{verdict}  {:<30} max error {e:.3e}  tolerance {:.1e}", self.name, self.tolerance),
            (None, None) => write!(f, "{verdict}  {:<30} no error measured", self.name),
        }
    }
}

/// Every check's line, in order.
#[derive(Debug, Clone, Default)]
pub struct SelftestReport {
    pub checks: Vec<CheckResult>,
}

impl SelftestReport {
    pub fn failed(&self) -> Vec<&CheckResult> {
        self.checks.iter().filter(|c| !c.passed()).collect()
    }
}

/// Largest absolute errors allowed, by the weights' dtype. Half-precision weights round every
/// activation to ~3 significant digits, and the trajectory's log-probs divide eps errors by small
/// late-step sigmas, so their tolerances are looser than f32's.
#[derive(Debug, Clone, Copy)]
pub struct Tolerances {
    /// UNet noise predictions, text encoder states (relative to nothing: values are O(1)).
    pub activation: f32,
    /// Decoded images in -1..1.
    pub image: f32,
    /// Per-step log-probs of a trajectory, recomputed from its stored transitions.
    pub log_prob: f32,
}

impl Tolerances {
    pub fn for_dtype(dtype: WeightDtype) -> Self {
        match dtype {
            WeightDtype::F32 => Self { activation: 1e-4, image: 1e-4, log_prob: 1e-3 },
            WeightDtype::F16 => Self { activation: 2e-2, image: 2e-2, log_prob: 1e-2 },
            WeightDtype::Bf16 => Self { activation: 1e-1, image: 1e-1, log_prob: 3e-1 },
        }
    }
}

/// Runs every check; a check that cannot run (a missing file, a device error) is a failed line,
/// not an early return, so one report says everything that is wrong.
pub fn run(options: &SelftestOptions) -> SelftestReport {
    let mut checks = sd::checks(options);
    checks.extend(shapes::checks(options));
    SelftestReport { checks }
}

/// The default fixtures folder: the source checkout's `tests/fixtures`.
pub fn default_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A measured check: `measure` gives the max error, or why it could not.
pub(crate) fn check(name: &str, tolerance: f32, measure: impl FnOnce() -> anyhow::Result<f32>) -> CheckResult {
    let (max_error, failure) = match measure() {
        Ok(e) if e.is_nan() => (None, Some("the error is NaN".to_string())),
        Ok(e) => (Some(e), None),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    CheckResult { name: name.to_string(), max_error, tolerance, failure }
}

/// Every failed check gets the same line: a whole group failing to load shows once per check.
pub(crate) fn failed(names: &[&str], tolerance: f32, why: &anyhow::Error) -> Vec<CheckResult> {
    names.iter().map(|n| check(n, tolerance, || Err(anyhow::anyhow!("{why:#}")))).collect()
}

/// The largest absolute difference of two tensors of one shape, compared in f32 on the CPU.
pub fn max_abs_diff(ours: &Tensor, reference: &Tensor) -> anyhow::Result<f32> {
    let ours = ours.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let reference = reference.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    anyhow::ensure!(
        ours.shape() == reference.shape(),
        "shape {:?} against the reference's {:?}",
        ours.dims(),
        reference.dims()
    );
    Ok((ours - reference)?.abs()?.flatten_all()?.max(0)?.to_scalar()?)
}

/// A golden safetensors file's tensors, loaded onto `device`.
pub struct Golden {
    path: PathBuf,
    tensors: HashMap<String, Tensor>,
}

impl Golden {
    pub fn load(path: &Path, device: &Device) -> anyhow::Result<Self> {
        let tensors = candle_core::safetensors::load(path, device).with_context(|| {
            format!("cannot read the golden file {} (pass --fixtures DIR holding tiny-sd/ and shapes-golden/)", path.display())
        })?;
        Ok(Self { path: path.to_path_buf(), tensors })
    }

    pub fn get(&self, key: &str) -> anyhow::Result<&Tensor> {
        self.tensors
            .get(key)
            .with_context(|| format!("{} has no tensor {key} (a stale or foreign golden file)", self.path.display()))
    }
}
