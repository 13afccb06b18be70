//! The DDIM step as DDPO needs it: a Gaussian policy step x_t -> x_{t-1} whose log-density is
//! returned (mean over all non-batch dimensions, as the reference implementation does), and the
//! same log-density recomputed differentiably for a stored transition.
//!
//! candle's own DDIM scheduler draws its noise internally and returns no log-prob, hence this.

use candle_core::{Result, Tensor};

use super::schedule::NoiseSchedule;
use crate::family::StepOutput;

/// Per-sample DDIM coefficients for one step, each shaped (N, 1, 1, 1) for broadcasting.
struct StepCoefficients {
    sqrt_ab_t: Tensor,
    sqrt_one_minus_ab_t: Tensor,
    sqrt_ab_prev: Tensor,
    /// sqrt(1 - ab_prev - sigma^2): weight of the predicted noise in the mean.
    direction: Tensor,
    sigma: Tensor,
    log_sigma: Tensor,
}

/// sigma_t of the DDIM step from `t` (to `t_prev`) with stochasticity `eta`.
pub fn ddim_sigma(schedule: &NoiseSchedule, t: usize, t_prev: usize, eta: f64) -> f64 {
    let (ab_t, ab_prev) = (schedule.alpha_bar(t), schedule.alpha_bar(t_prev));
    let variance = (1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev);
    eta * variance.max(0.0).sqrt()
}

fn coefficients(
    schedule: &NoiseSchedule,
    timesteps: &[usize],
    steps: usize,
    eta: f64,
    like: &Tensor,
) -> Result<StepCoefficients> {
    let column = |f: &dyn Fn(usize) -> f64| -> Result<Tensor> {
        let v: Vec<f32> = timesteps.iter().map(|&t| f(t) as f32).collect();
        Tensor::from_vec(v, (timesteps.len(), 1, 1, 1), like.device())?.to_dtype(like.dtype())
    };
    let prev = |t: usize| schedule.prev_timestep(t, steps);
    let sigma = |t: usize| ddim_sigma(schedule, t, prev(t), eta);
    if let Some(&t) = timesteps.iter().find(|&&t| !(sigma(t) > 0.0)) {
        candle_core::bail!(
            "DDIM step from t={t} has zero variance, so its log-prob is undefined \
             (use eta > 0 and a scheduler steps_offset >= 1)"
        )
    }
    Ok(StepCoefficients {
        sqrt_ab_t: column(&|t| schedule.alpha_bar(t).sqrt())?,
        sqrt_one_minus_ab_t: column(&|t| (1.0 - schedule.alpha_bar(t)).sqrt())?,
        sqrt_ab_prev: column(&|t| schedule.alpha_bar(prev(t)).sqrt())?,
        direction: column(&|t| (1.0 - schedule.alpha_bar(prev(t)) - sigma(t).powi(2)).max(0.0).sqrt())?,
        sigma: column(&sigma)?,
        log_sigma: column(&|t| sigma(t).ln())?,
    })
}

/// One DDIM step with log-prob.
///
/// - `eps`: the (guided) noise prediction at `sample`, (N, C, H, W); gradients flow through it.
/// - `timesteps`: each sample's current training timestep t (one per batch row).
/// - `steps`: number of inference steps (sets t_prev = t - T/steps, clamped at 0).
/// - `prev_sample`: `Some(x)` to score a stored transition (no noise drawn, no gradient through
///   `x`), or `None` to draw x_{t-1} = mean + sigma * `noise`.
pub fn ddim_step(
    schedule: &NoiseSchedule,
    eps: &Tensor,
    timesteps: &[usize],
    sample: &Tensor,
    steps: usize,
    eta: f64,
    prev_sample: Option<&Tensor>,
    noise: Option<&Tensor>,
) -> Result<StepOutput> {
    if timesteps.len() != sample.dim(0)? {
        candle_core::bail!(
            "ddim_step: {} timesteps for a batch of {}",
            timesteps.len(),
            sample.dim(0)?
        )
    }
    let c = coefficients(schedule, timesteps, steps, eta, sample)?;
    let pred_original = sample
        .broadcast_sub(&eps.broadcast_mul(&c.sqrt_one_minus_ab_t)?)?
        .broadcast_div(&c.sqrt_ab_t)?;
    // As in diffusers and the DDPO reference: clamp x0 but keep the model's eps for the direction.
    let r = schedule.config.clip_sample_range;
    let x0 = if schedule.config.clip_sample { pred_original.clamp(-r, r)? } else { pred_original.clone() };
    let mean = x0
        .broadcast_mul(&c.sqrt_ab_prev)?
        .broadcast_add(&eps.broadcast_mul(&c.direction)?)?;
    let prev_sample = match (prev_sample, noise) {
        (Some(x), _) => x.detach(),
        (None, Some(z)) => mean.broadcast_add(&z.broadcast_mul(&c.sigma)?)?.detach(),
        (None, None) => candle_core::bail!("ddim_step: give either prev_sample or noise"),
    };
    let log_prob = gaussian_log_prob(&prev_sample, &mean, &c.sigma, &c.log_sigma)?;
    Ok(StepOutput { prev_sample, mean, pred_original, log_prob, sigma: c.sigma })
}

/// Mean over non-batch dimensions of the log-density of `x` under N(mean, sigma^2).
pub(crate) fn gaussian_log_prob(x: &Tensor, mean: &Tensor, sigma: &Tensor, log_sigma: &Tensor) -> Result<Tensor> {
    let half_log_2pi = 0.5 * (2.0 * std::f64::consts::PI).ln();
    let var2 = (sigma.sqr()? * 2.0)?;
    let lp = (x - mean)?
        .sqr()?
        .broadcast_div(&var2)?
        .neg()?
        .broadcast_sub(log_sigma)?
        .affine(1.0, -half_log_2pi)?;
    lp.flatten_from(1)?.mean(1)
}
