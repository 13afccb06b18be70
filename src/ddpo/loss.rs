//! The policy-gradient objectives of DDPO on per-(sample, timestep) log-probabilities:
//! the importance-sampled, PPO-clipped objective (DDPO-IS) and the score-function one (DDPO-SF),
//! plus the diagnostics the reference logs (approx KL, clip fraction).

use candle_core::{Result, Tensor};

/// A loss to minimise and its diagnostics.
pub struct PolicyLoss {
    pub loss: Tensor,
    /// 0.5 * mean((logp_new - logp_old)^2).
    pub approx_kl: f64,
    /// Fraction of ratios outside [1 - clip, 1 + clip].
    pub clipfrac: f64,
    /// Fraction of ratios above 1 + clip (the update made the sample likelier than clipping allows).
    pub clipfrac_high: f64,
    /// Fraction of ratios below 1 - clip.
    pub clipfrac_low: f64,
    /// Per-sample ratio exp(logp_new - logp_old), detached, (N,).
    pub ratio: Tensor,
}

/// DDPO-IS: mean(max(-A r, -A clip(r, 1 - eps, 1 + eps))), r = exp(logp_new - logp_old).
pub fn ppo_clip_loss(logp_new: &Tensor, logp_old: &Tensor, advantages: &Tensor, clip_range: f64) -> Result<PolicyLoss> {
    let diff = (logp_new - logp_old)?;
    let ratio = diff.exp()?;
    let unclipped = (advantages.neg()? * &ratio)?;
    let clipped = (advantages.neg()? * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)?)?;
    let loss = unclipped.maximum(&clipped)?.mean_all()?;
    let approx_kl = (diff.detach().sqr()?.mean_all()?.to_scalar::<f32>()? * 0.5) as f64;
    let ratio = ratio.detach();
    let fraction = |mask: Tensor| -> Result<f64> { Ok(mask.to_dtype(candle_core::DType::F32)?.mean_all()?.to_scalar::<f32>()? as f64) };
    let clipfrac_high = fraction(ratio.gt(1.0 + clip_range)?)?;
    let clipfrac_low = fraction(ratio.lt(1.0 - clip_range)?)?;
    Ok(PolicyLoss { loss, approx_kl, clipfrac: clipfrac_high + clipfrac_low, clipfrac_high, clipfrac_low, ratio })
}

/// DDPO-SF (REINFORCE): -mean(A logp). Its gradient equals DDPO-IS's at ratio 1.
pub fn score_function_loss(logp_new: &Tensor, logp_old: &Tensor, advantages: &Tensor) -> Result<PolicyLoss> {
    let loss = (advantages * logp_new)?.mean_all()?.neg()?;
    let diff = (logp_new - logp_old)?.detach();
    let approx_kl = (diff.sqr()?.mean_all()?.to_scalar::<f32>()? * 0.5) as f64;
    Ok(PolicyLoss { loss, approx_kl, clipfrac: 0.0, clipfrac_high: 0.0, clipfrac_low: 0.0, ratio: diff.exp()? })
}

/// RWR weights: softmax(A / beta) scaled to mean 1, so the weighted denoising loss keeps the scale
/// of the unweighted one.
pub fn rwr_weights(advantages: &[f64], beta: f64) -> Vec<f64> {
    let max = advantages.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = advantages.iter().map(|a| ((a - max) / beta).exp()).collect();
    let mean = w.iter().sum::<f64>() / w.len().max(1) as f64;
    w.into_iter().map(|v| v / mean).collect()
}
