//! One DDPO epoch: sample trajectories (rewards computed on a worker pool while the next batch
//! samples), turn rewards into advantages, then update the policy over inner epochs and
//! minibatches with DDPO-IS, DDPO-SF or RWR.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use candle_core::{Tensor, Var, D};
use rand::seq::SliceRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::advantage::{Normalisation, StatTracker};
use super::loss::{ppo_clip_loss, rwr_weights, score_function_loss};
use super::prompts::PromptSource;
use crate::kernels::shards;
use crate::optim::{accumulate, clip_grad_norm, AdamW, AdamWConfig, Grads};
use crate::policy::Policy;
use crate::reward::{check_finite, Reward, Score};
use crate::sampler::{self, NoiseRng, SamplerConfig, StepOutput, Trajectory};

/// The policy-gradient estimator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// Importance sampling with PPO clipping (several updates per batch).
    Is,
    /// Score function (REINFORCE): one gradient step per sampled batch.
    Sf,
    /// Reward-weighted regression on the denoising loss (the paper's baseline).
    Rwr,
}

/// Every DDPO hyper-parameter, validated once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub algorithm: Algorithm,
    pub samples_per_epoch: usize,
    pub sample_batch_size: usize,
    pub train_batch_size: usize,
    pub inner_epochs: usize,
    /// Minibatches whose gradients are summed before one optimiser step.
    pub grad_accum: usize,
    /// Fraction of each trajectory's steps trained on (a random subset per sample).
    pub timestep_fraction: f64,
    pub clip_range: f64,
    pub adv_clip: f64,
    pub normalisation: Normalisation,
    pub rwr_beta: f64,
    pub optimizer: AdamWConfig,
    pub grad_clip: f64,
    pub sampler: SamplerConfig,
    pub reward_workers: usize,
    pub seed: u64,
    /// Trajectory steps whose policy noise (DDIM sigma) is below this are left out of the
    /// policy-gradient loss (DDPO-IS / SF). With few sampling steps, the step into t = 1 is
    /// nearly deterministic (sigma ~ 0.015) while its mean moves with the noise prediction, so
    /// its score term carries a 1/sigma weight (12x the other steps' at 20 steps, 23x at 10)
    /// and swamps the gradient with noise that has almost nothing to do with the reward.
    /// 0 keeps every step, as the reference (at 50 steps this weight is 5x). Default 0.02.
    #[serde(default)]
    pub min_train_sigma: f64,
    /// Also train the text encoder's weights (as pretraining does). Off by default, as in the
    /// DDPO reference: the reward shapes the images, and a drifting prompt encoder only blurs
    /// the conditioning (the sampler reads prompts through it at every step).
    #[serde(default)]
    pub train_text_encoder: bool,
    /// Train only the weights whose name contains one of these (e.g. `attn2.to_k`,
    /// `attn2.to_v`: the cross-attention projections of the prompt, as Custom Diffusion does);
    /// empty trains them all. Applies within what `train_text_encoder` leaves trainable.
    #[serde(default)]
    pub train_only: Vec<String>,
    /// Weight of a penalty on the predicted x0 leaving the pixel range [-1, 1]:
    /// `range_penalty * alpha_bar_t * mean(relu(|x0| - 1)^2)` over the trained steps, added to
    /// the DDPO-IS / SF loss. alpha_bar_t is x0's share of x_t: the late steps, whose x0 is the
    /// image, count fully; the early ones, whose x0 is the noisy input divided by
    /// sqrt(alpha_bar) ~ 0.02 and routinely far out of range, hardly at all.
    ///
    /// Without the sampler's x0 clamp (which makes DDPO train backwards on saturated colours)
    /// nothing stops a policy from drifting out of range, where every reward sees the same
    /// clipped pixels: incompressibility collapsed to flat red that way after 20 epochs, and
    /// with weight 1 ran 51 epochs without collapsing. Off (0) by default: on compressibility
    /// even a weight of 0.1 steered the run away from its reward (Adam gives the penalty's
    /// consistent gradient full-size steps). Pixel-space models only.
    #[serde(default)]
    pub range_penalty: f64,
    /// Weight of a KL term to the base model (DPOK's regulariser): `kl_weight * KL(p_θ || p_base)`
    /// of each trained transition, the closed form for two Gaussians with the same sigma,
    /// `|mean_θ - mean_base|^2 / (2 sigma^2)` averaged over the pixels, added to the DDPO-IS /
    /// SF loss. It pulls back any change that the reward does not pay for, such as the drift
    /// of noisy updates; it costs one more (gradient-free) forward pass per trained step. Off (0)
    /// by default.
    #[serde(default)]
    pub kl_weight: f64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::Is,
            samples_per_epoch: 32,
            sample_batch_size: 16,
            train_batch_size: 8,
            inner_epochs: 1,
            grad_accum: 1,
            timestep_fraction: 1.0,
            clip_range: 0.1,
            adv_clip: 5.0,
            normalisation: Normalisation::PerPrompt { buffer_size: 32, min_count: 4 },
            rwr_beta: 1.0,
            optimizer: AdamWConfig { lr: 2e-4, warmup_steps: 16, ..Default::default() },
            grad_clip: 1.0,
            // Fewer, larger steps than sampling's default: see `ddpo train --steps`.
            sampler: SamplerConfig { steps: 10, ..SamplerConfig::default() },
            reward_workers: 1,
            seed: 0,
            train_text_encoder: false,
            train_only: Vec::new(),
            min_train_sigma: 0.02,
            range_penalty: 0.0,
            kl_weight: 0.0,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        let c = self;
        anyhow::ensure!(c.samples_per_epoch > 0, "--samples-per-epoch must be at least 1");
        anyhow::ensure!(c.sample_batch_size > 0, "--sample-batch-size must be at least 1");
        anyhow::ensure!(c.train_batch_size > 0, "--train-batch-size must be at least 1");
        anyhow::ensure!(
            c.train_batch_size <= c.samples_per_epoch,
            "--train-batch-size {} is larger than --samples-per-epoch {}",
            c.train_batch_size,
            c.samples_per_epoch
        );
        anyhow::ensure!(c.inner_epochs > 0, "--inner-epochs must be at least 1");
        anyhow::ensure!(c.grad_accum > 0, "--grad-accum must be at least 1");
        anyhow::ensure!(
            c.timestep_fraction > 0.0 && c.timestep_fraction <= 1.0,
            "--timestep-fraction must be in (0, 1], got {}",
            c.timestep_fraction
        );
        anyhow::ensure!(c.optimizer.lr > 0.0 && c.optimizer.lr.is_finite(), "--lr must be a positive number, got {}", c.optimizer.lr);
        anyhow::ensure!(c.clip_range > 0.0, "--clip-range must be positive, got {}", c.clip_range);
        anyhow::ensure!(c.rwr_beta > 0.0, "--rwr-beta must be positive, got {}", c.rwr_beta);
        anyhow::ensure!(c.reward_workers > 0, "--reward-workers must be at least 1");
        anyhow::ensure!(
            c.min_train_sigma >= 0.0 && c.min_train_sigma.is_finite(),
            "--min-train-sigma must be a non-negative number, got {}",
            c.min_train_sigma
        );
        anyhow::ensure!(
            c.range_penalty >= 0.0 && c.range_penalty.is_finite(),
            "--range-penalty must be a non-negative number, got {}",
            c.range_penalty
        );
        anyhow::ensure!(
            c.kl_weight >= 0.0 && c.kl_weight.is_finite(),
            "--kl-weight must be a non-negative number, got {}",
            c.kl_weight
        );
        if let Normalisation::PerPrompt { buffer_size, min_count } = c.normalisation {
            // One reward has no spread to normalise by.
            anyhow::ensure!(min_count >= 2, "--stat-min-count must be at least 2, got {min_count}");
            anyhow::ensure!(
                buffer_size >= min_count,
                "--stat-buffer {buffer_size} is smaller than --stat-min-count {min_count}: no prompt would ever use its own statistics"
            );
        }
        Ok(())
    }

    /// Indices of the sampling steps (0 = the first, noisiest) whose DDIM sigma under `schedule`
    /// reaches `min_train_sigma`: the steps the policy-gradient loss uses.
    pub fn trained_steps(&self, schedule: &sampler::NoiseSchedule) -> anyhow::Result<Vec<usize>> {
        let timesteps = schedule.ddim_timesteps(self.sampler.steps);
        let sigma = |t: usize| sampler::ddim_sigma(schedule, t, schedule.prev_timestep(t, self.sampler.steps), self.sampler.eta);
        let steps: Vec<usize> = (0..timesteps.len()).filter(|&k| sigma(timesteps[k]) >= self.min_train_sigma).collect();
        anyhow::ensure!(
            !steps.is_empty() || self.algorithm == Algorithm::Rwr,
            "--min-train-sigma {} leaves none of the {} sampling steps to train on (their largest sigma is {:.3}): lower it or use more --steps",
            self.min_train_sigma,
            timesteps.len(),
            timesteps.iter().map(|&t| sigma(t)).fold(0.0, f64::max)
        );
        Ok(steps)
    }

    /// Trajectory steps trained on per sample, out of `available`: `timestep_fraction` of them,
    /// at least one.
    fn train_steps(&self, available: usize) -> usize {
        ((available as f64 * self.timestep_fraction).ceil() as usize).clamp(1, available)
    }
}

/// What one epoch did, for logging and the run folder.
#[derive(Debug, Clone)]
pub struct EpochReport {
    pub epoch: usize,
    pub prompts: Vec<String>,
    pub scores: Vec<Score>,
    pub images: Vec<image::RgbImage>,
    pub loss: f64,
    pub approx_kl: f64,
    pub clipfrac: f64,
    /// Loss of the first minibatch before any update (for IS its ratio is exactly 1).
    pub first_ratio_max_dev: f64,
    /// The range penalty's term before its weight: alpha_bar_t * mean(relu(|x0| - 1)^2) over the
    /// trained steps' predicted x0.
    pub x0_excess: f64,
    /// Mean KL of the trained transitions to the base model's (0 without a base model).
    pub kl_base: f64,
    /// Fraction of the final samples' values outside [-1, 1], which the images clip (NaN for
    /// latent-space models).
    pub out_of_range: f64,
    pub lr: f64,
    pub optimizer_steps: usize,
    pub seconds_sampling: f64,
    pub seconds_reward: f64,
    pub seconds_training: f64,
}

impl EpochReport {
    pub fn rewards(&self) -> Vec<f64> {
        self.scores.iter().map(|s| s.total).collect()
    }
}

/// The DDPO training state that a checkpoint must hold (besides the weights).
pub struct Trainer {
    pub config: TrainConfig,
    pub policy: Policy,
    pub opt: AdamW,
    pub stats: StatTracker,
    pub rng: NoiseRng,
    pub epoch: usize,
    reward: Arc<dyn Reward>,
    prompts: Box<dyn PromptSource>,
    progress: Option<ProgressFn>,
    /// The frozen base model of `--kl-weight`.
    base: Option<Policy>,
}

/// The part of an epoch that is running, for progress bars.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Sampling trajectories (counted in images).
    Sampling,
    /// Policy updates (counted in backward passes).
    Training,
}

/// Called with (stage, done, total) as an epoch advances.
pub type ProgressFn = Box<dyn FnMut(Stage, usize, usize) + Send>;

/// One epoch's samples, flattened over batches.
struct Samples {
    prompts: Vec<String>,
    /// (N, steps + 1, C, H, W)
    latents: Tensor,
    /// (N, steps)
    log_probs: Tensor,
    timesteps: Vec<usize>,
}

impl Trainer {
    pub fn new(
        config: TrainConfig,
        policy: Policy,
        reward: Arc<dyn Reward>,
        prompts: Box<dyn PromptSource>,
    ) -> anyhow::Result<Self> {
        config.validate()?;
        config.sampler.validate(policy.schedule.num_train_timesteps())?;
        config.trained_steps(&policy.schedule)?;
        anyhow::ensure!(
            config.kl_weight == 0.0 || config.algorithm != Algorithm::Rwr,
            "--kl-weight regularises DDPO-IS / SF updates; RWR has no per-step policy to compare: use --kl-weight 0"
        );
        anyhow::ensure!(
            config.range_penalty == 0.0 || policy.vae.is_none(),
            "--range-penalty keeps pixel-space samples inside [-1, 1], but this model samples VAE latents, \
             which have no fixed range: use --range-penalty 0"
        );
        let vars: Vec<_> = policy
            .trainable_vars()
            .into_iter()
            .filter(|(name, _)| config.train_text_encoder || !name.starts_with("text_encoder."))
            .collect();
        anyhow::ensure!(!vars.is_empty(), "the policy has no trainable weights (load it with load_trainable)");
        let vars = select_vars(vars, &config.train_only)?;
        let opt = AdamW::new(vars, config.optimizer)?;
        let rng = NoiseRng::new(config.seed);
        Ok(Self { config, policy, opt, stats: StatTracker::default(), rng, epoch: 0, reward, prompts, progress: None, base: None })
    }

    /// Sets the frozen base model that `kl_weight` measures the policy against.
    pub fn set_base(&mut self, base: Policy) {
        self.base = Some(base);
    }

    /// Reports sampling and training progress to `f` (e.g. to draw progress bars).
    pub fn set_progress(&mut self, f: ProgressFn) {
        self.progress = Some(f);
    }

    fn report(&mut self, stage: Stage, done: usize, total: usize) {
        if let Some(f) = self.progress.as_mut() {
            f(stage, done, total);
        }
    }

    /// Replaces the reward (e.g. after a script reload); state is kept.
    pub fn set_reward(&mut self, reward: Arc<dyn Reward>) {
        self.reward = reward;
    }

    /// Samples, scores and trains once. On a bad reward nothing is updated.
    pub fn run_epoch(&mut self) -> anyhow::Result<EpochReport> {
        let epoch = self.epoch;
        let t0 = Instant::now();
        let (samples, scores, images, seconds_reward) =
            self.sample_and_score().with_context(|| format!("epoch {epoch}"))?;
        let seconds_sampling = t0.elapsed().as_secs_f64() - seconds_reward;
        let rewards: Vec<f64> = scores.iter().map(|s| s.total).collect();
        let adv = self.stats.advantages(&samples.prompts, &rewards, self.config.normalisation);
        let adv: Vec<f64> = adv.iter().map(|a| a.clamp(-self.config.adv_clip, self.config.adv_clip)).collect();
        let t1 = Instant::now();
        let update = match self.config.algorithm {
            Algorithm::Is | Algorithm::Sf => self.policy_gradient_update(&samples, &adv),
            Algorithm::Rwr => self.rwr_update(&samples, &adv),
        }
        .with_context(|| format!("epoch {epoch}: policy update"))?;
        self.epoch += 1;
        let out_of_range = match self.policy.vae {
            None => out_of_range_fraction(&samples.latents, samples.timesteps.len(), self.policy.schedule.config.clip_sample_range)?,
            Some(_) => f64::NAN, // latents have no fixed range
        };
        Ok(EpochReport {
            epoch,
            prompts: samples.prompts,
            scores,
            images,
            loss: update.loss,
            approx_kl: update.approx_kl,
            clipfrac: update.clipfrac,
            first_ratio_max_dev: update.first_ratio_max_dev,
            x0_excess: update.x0_excess,
            kl_base: update.kl_base,
            out_of_range,
            lr: self.opt.config.lr,
            optimizer_steps: update.steps,
            seconds_sampling,
            seconds_reward,
            seconds_training: t1.elapsed().as_secs_f64(),
        })
    }

    /// Samples the epoch's trajectories batch by batch; each finished batch goes to the reward
    /// workers while the next one samples. Returns the samples, scores, images and the seconds
    /// spent waiting for rewards after sampling finished.
    fn sample_and_score(&mut self) -> anyhow::Result<(Samples, Vec<Score>, Vec<image::RgbImage>, f64)> {
        let cfg = self.config.clone();
        let prompts = (0..cfg.samples_per_epoch)
            .map(|_| self.prompts.next_prompt(self.rng.rng()))
            .collect::<anyhow::Result<Vec<_>>>()
            .context("drawing prompts")?;
        let batches: Vec<&[String]> = prompts.chunks(cfg.sample_batch_size).collect();
        let (job_tx, job_rx) = crossbeam::channel::unbounded::<(usize, Vec<image::RgbImage>, Vec<String>)>();
        let (res_tx, res_rx) = crossbeam::channel::unbounded();
        let policy = &self.policy;
        let progress = &mut self.progress;
        let total = prompts.len();
        let rng = &mut self.rng;
        let reward = self.reward.clone();
        let (trajectories, mut results, wait) = crossbeam::scope(|s| -> anyhow::Result<_> {
            for _ in 0..cfg.reward_workers {
                let (job_rx, res_tx, reward) = (job_rx.clone(), res_tx.clone(), reward.clone());
                s.spawn(move |_| {
                    for (i, images, prompts) in job_rx {
                        let scores = reward.score(&images, &prompts);
                        let _ = res_tx.send((i, scores, images));
                    }
                });
            }
            drop(res_tx);
            let mut trajectories: Vec<Trajectory> = Vec::new();
            for (i, batch) in batches.iter().enumerate() {
                let traj = sampler::sample(policy, batch, &cfg.sampler, rng)?;
                let images = policy.images(traj.final_sample())?;
                job_tx.send((i, images, batch.to_vec())).expect("reward workers alive");
                trajectories.push(traj);
                if let Some(f) = progress.as_mut() {
                    f(Stage::Sampling, ((i + 1) * cfg.sample_batch_size).min(total), total);
                }
            }
            drop(job_tx);
            let waiting = Instant::now();
            let results: Vec<_> = res_rx.iter().collect();
            Ok((trajectories, results, waiting.elapsed().as_secs_f64()))
        })
        .map_err(|_| anyhow::anyhow!("a reward worker panicked"))??;
        results.sort_by_key(|r| r.0);
        let (mut scores, mut images) = (Vec::new(), Vec::new());
        for (i, batch_scores, batch_images) in results {
            let batch_scores = batch_scores.with_context(|| format!("reward {}", reward.name()))?;
            anyhow::ensure!(batch_scores.len() == batch_images.len(), "reward {} returned {} scores for {} images", reward.name(), batch_scores.len(), batch_images.len());
            check_finite(&batch_scores, batches[i], i * cfg.sample_batch_size)?;
            scores.extend(batch_scores);
            images.extend(batch_images);
        }
        let latents: Vec<Tensor> = trajectories.iter().map(|t| Tensor::stack(&t.latents, 1)).collect::<candle_core::Result<_>>()?;
        let log_probs: Vec<&Tensor> = trajectories.iter().map(|t| &t.log_probs).collect();
        let samples = Samples {
            prompts,
            latents: Tensor::cat(&latents, 0)?,
            log_probs: Tensor::cat(&log_probs, 0)?,
            timesteps: trajectories[0].timesteps.clone(),
        };
        Ok((samples, scores, images, wait))
    }

    /// DDPO-IS / DDPO-SF over inner epochs, minibatches and (a random subset of) timesteps.
    fn policy_gradient_update(&mut self, s: &Samples, adv: &[f64]) -> anyhow::Result<UpdateStats> {
        let cfg = self.config.clone();
        let n = s.prompts.len();
        let eligible = cfg.trained_steps(&self.policy.schedule)?;
        let k = cfg.train_steps(eligible.len());
        let sf = cfg.algorithm == Algorithm::Sf;
        let inner = if sf { 1 } else { cfg.inner_epochs };
        let minibatches = n.div_ceil(cfg.train_batch_size);
        let accum = if sf { minibatches } else { cfg.grad_accum };
        let mut stats = UpdateStats::default();
        let mut grads: Grads = Vec::new();
        let mut pending = 0;
        for _ in 0..inner {
            let mut order: Vec<usize> = (0..n).collect();
            order.shuffle(self.rng.rng());
            let step_order: Vec<Vec<usize>> = (0..n)
                .map(|_| {
                    let mut p = eligible.clone();
                    p.shuffle(self.rng.rng());
                    p
                })
                .collect();
            for mb in order.chunks(cfg.train_batch_size) {
                for j in 0..k {
                    let ks: Vec<usize> = mb.iter().map(|&i| step_order[i][j]).collect();
                    let terms = self.minibatch_grads(s, mb, &ks, adv)?;
                    if stats.terms == 0 {
                        stats.first_ratio_max_dev = terms.ratio_dev;
                    }
                    // Each shard into the running sum (not shards summed first): the same
                    // additions, in the same order, as the runs in RESULTS.md.
                    for g in &terms.grads {
                        accumulate(&mut grads, &self.opt.collect(g), 1.0 / (k * accum) as f64)?;
                    }
                    stats.x0_excess += terms.x0_excess;
                    stats.kl_base += terms.kl_base;
                    stats.add(terms.loss, terms.approx_kl, terms.clipfrac);
                    self.report(Stage::Training, stats.terms, inner * minibatches * k);
                }
                pending += 1;
                if pending == accum {
                    self.optimizer_step(&mut grads, &mut stats)?;
                    pending = 0;
                }
            }
        }
        if pending > 0 {
            self.optimizer_step(&mut grads, &mut stats)?;
        }
        Ok(stats.finish())
    }

    /// Gradients and diagnostics of one minibatch at one trajectory step per sample, computed
    /// in one shard per CPU core ([`crate::kernels::shards`]): each shard's loss is weighted by
    /// its share of the minibatch, so the shards' gradients sum to the minibatch's.
    fn minibatch_grads(&self, s: &Samples, mb: &[usize], ks: &[usize], adv: &[f64]) -> anyhow::Result<MinibatchGrads> {
        let (policy, base, config) = (&self.policy, self.base.as_ref(), &self.config);
        let parts = shards::sharded_backward(mb.len(), &policy.device, |r| -> anyhow::Result<_> {
            let terms = transition_loss(policy, base, config, s, &mb[r.clone()], &ks[r], adv)?;
            Ok((terms.loss.clone(), terms))
        })?;
        let mut out = MinibatchGrads::default();
        for part in parts {
            let (share, terms) = (part.share, part.extra);
            out.loss += share * terms.loss.to_scalar::<f32>()? as f64;
            out.approx_kl += share * terms.approx_kl;
            out.clipfrac += share * terms.clipfrac;
            out.x0_excess += share * terms.x0_excess;
            out.kl_base += share * terms.kl_base;
            out.ratio_dev = out.ratio_dev.max(terms.ratio_dev);
            out.grads.push(part.grads);
        }
        Ok(out)
    }

    /// RWR: the DDPM denoising loss on the epoch's own samples, weighted by softmax(A / beta).
    fn rwr_update(&mut self, s: &Samples, adv: &[f64]) -> anyhow::Result<UpdateStats> {
        let cfg = self.config.clone();
        let n = s.prompts.len();
        let weights = rwr_weights(adv, cfg.rwr_beta);
        let last = cfg.sampler.steps;
        let device = self.policy.device.clone();
        let mut stats = UpdateStats::default();
        let mut grads: Grads = Vec::new();
        let mut pending = 0;
        let k = cfg.train_steps(cfg.sampler.steps);
        for _ in 0..cfg.inner_epochs {
            let mut order: Vec<usize> = (0..n).collect();
            order.shuffle(self.rng.rng());
            for mb in order.chunks(cfg.train_batch_size) {
                let rows: Vec<Tensor> = mb.iter().map(|&i| s.latents.get(i)?.get(last)).collect::<candle_core::Result<_>>()?;
                let x0 = Tensor::stack(&rows, 0)?;
                let prompts: Vec<String> = mb.iter().map(|&i| s.prompts[i].clone()).collect();
                let w = Tensor::from_vec(mb.iter().map(|&i| weights[i] as f32).collect::<Vec<_>>(), mb.len(), &device)?;
                for _ in 0..k {
                    let t: Vec<usize> = mb.iter().map(|_| self.rng.rng().random_range(0..self.policy.schedule.num_train_timesteps())).collect();
                    let noise = self.rng.randn(x0.shape(), &device)?;
                    let x_t = self.policy.schedule.add_noise(&x0, &noise, &t)?;
                    let ctx = self.policy.encode_prompts(&prompts)?;
                    let pred = self.policy.predict_eps(&x_t, &t, &ctx)?;
                    let per_sample = (pred - noise)?.sqr()?.flatten_from(1)?.mean(1)?;
                    let loss = (per_sample * &w)?.mean_all()?;
                    let g = self.opt.collect(&loss.backward()?);
                    accumulate(&mut grads, &g, 1.0 / (k * cfg.grad_accum) as f64)?;
                    stats.add(loss.to_scalar::<f32>()? as f64, 0.0, 0.0);
                    self.report(Stage::Training, stats.terms, cfg.inner_epochs * n.div_ceil(cfg.train_batch_size) * k);
                }
                pending += 1;
                if pending == cfg.grad_accum {
                    self.optimizer_step(&mut grads, &mut stats)?;
                    pending = 0;
                }
            }
        }
        if pending > 0 {
            self.optimizer_step(&mut grads, &mut stats)?;
        }
        Ok(stats.finish())
    }

    fn optimizer_step(&mut self, grads: &mut Grads, stats: &mut UpdateStats) -> anyhow::Result<()> {
        let norm = clip_grad_norm(grads, self.config.grad_clip)?;
        anyhow::ensure!(norm.is_finite(), "gradient norm is {norm}; the update was skipped and the weights are unchanged");
        self.opt.step(grads)?;
        grads.clear();
        stats.steps += 1;
        Ok(())
    }
}

/// Running means of the update's diagnostics.
#[derive(Debug, Default)]
struct UpdateStats {
    loss: f64,
    approx_kl: f64,
    clipfrac: f64,
    terms: usize,
    steps: usize,
    first_ratio_max_dev: f64,
    x0_excess: f64,
    kl_base: f64,
}

/// Loss of a minibatch at one trajectory step per sample (`ks[i]` for sample `mb[i]`), with
/// its diagnostics.
fn transition_loss(policy: &Policy, base: Option<&Policy>, config: &TrainConfig, s: &Samples, mb: &[usize], ks: &[usize], adv: &[f64]) -> anyhow::Result<TransitionLoss> {
    let pick = |offset: usize| -> candle_core::Result<Tensor> {
        let rows: Vec<Tensor> = mb
            .iter()
            .zip(ks)
            .map(|(&i, &k)| s.latents.get(i)?.get(k + offset))
            .collect::<candle_core::Result<_>>()?;
        Tensor::stack(&rows, 0)
    };
    let (x_t, x_prev) = (pick(0)?, pick(1)?);
    let timesteps: Vec<usize> = ks.iter().map(|&k| s.timesteps[k]).collect();
    let prompts: Vec<String> = mb.iter().map(|&i| s.prompts[i].clone()).collect();
    let old: Vec<f32> = mb
        .iter()
        .zip(ks)
        .map(|(&i, &k)| s.log_probs.get(i)?.get(k)?.to_scalar::<f32>())
        .collect::<candle_core::Result<_>>()?;
    let device = &policy.device;
    let old = Tensor::from_vec(old, mb.len(), device)?;
    let a = Tensor::from_vec(mb.iter().map(|&i| adv[i] as f32).collect::<Vec<_>>(), mb.len(), device)?;
    let step = sampler::transition(policy, &prompts, &x_t, &x_prev, &timesteps, &config.sampler)?;
    let new = &step.log_prob;
    let ratio_dev = (new.detach() - &old)?.exp()?.affine(1.0, -1.0)?.abs()?.max(D::Minus1)?.to_scalar::<f32>()? as f64;
    let l = match config.algorithm {
        Algorithm::Sf => score_function_loss(new, &old, &a)?,
        _ => ppo_clip_loss(new, &old, &a, config.clip_range)?,
    };
    let (mut loss, mut x0_excess, mut kl_base) = (l.loss, 0.0, 0.0);
    if config.range_penalty > 0.0 {
        let weights: Vec<f32> = timesteps.iter().map(|&t| policy.schedule.alpha_bar(t) as f32).collect();
        let weights = Tensor::from_vec(weights, mb.len(), device)?;
        let excess = range_excess(&step.pred_original, policy.schedule.config.clip_sample_range, &weights)?;
        x0_excess = excess.to_scalar::<f32>()? as f64;
        loss = (loss + (excess * config.range_penalty)?)?;
    }
    if config.kl_weight > 0.0 {
        let base = base.context("--kl-weight needs the base model (Trainer::set_base)")?;
        let base_step = sampler::transition(base, &prompts, &x_t, &x_prev, &timesteps, &config.sampler)?;
        let kl = kl_to_base(&step, &base_step)?;
        kl_base = kl.to_scalar::<f32>()? as f64;
        loss = (loss + (kl * config.kl_weight)?)?;
    }
    Ok(TransitionLoss { loss, approx_kl: l.approx_kl, clipfrac: l.clipfrac, ratio_dev, x0_excess, kl_base })
}

/// Batch mean of KL(p_θ(x_prev | x_t) || p_base(x_prev | x_t)) per pixel. Both steps have the
/// same sigma, so it is |mean_θ - mean_base|^2 / (2 sigma^2), averaged over the non-batch
/// dimensions (as the log-probabilities are). Differentiable in the policy's step only.
pub fn kl_to_base(step: &StepOutput, base: &StepOutput) -> candle_core::Result<Tensor> {
    let d = (&step.mean - base.mean.detach())?;
    let per_pixel = d.sqr()?.broadcast_div(&(step.sigma.sqr()? * 2.0)?)?;
    per_pixel.flatten_from(1)?.mean(1)?.mean_all()
}

/// One minibatch-step's gradients (one store per shard) and its diagnostics.
#[derive(Default)]
struct MinibatchGrads {
    grads: Vec<candle_core::backprop::GradStore>,
    loss: f64,
    approx_kl: f64,
    clipfrac: f64,
    ratio_dev: f64,
    x0_excess: f64,
    kl_base: f64,
}

/// One minibatch-step's loss and diagnostics.
struct TransitionLoss {
    loss: Tensor,
    approx_kl: f64,
    clipfrac: f64,
    /// max |ratio - 1| over the minibatch.
    ratio_dev: f64,
    x0_excess: f64,
    kl_base: f64,
}

/// mean_i(w_i * mean(relu(|x_i| - range)^2)) over the batch rows x_i: zero inside the range,
/// growing smoothly outside it.
pub fn range_excess(x: &Tensor, range: f64, weights: &Tensor) -> candle_core::Result<Tensor> {
    let per_row = x.abs()?.affine(1.0, -range)?.relu()?.sqr()?.flatten_from(1)?.mean(1)?;
    (per_row * weights)?.mean_all()
}

/// Fraction of the final samples' values (step `last` of each (N, steps + 1, ..) trajectory)
/// outside [-range, range].
fn out_of_range_fraction(latents: &Tensor, last: usize, range: f64) -> candle_core::Result<f64> {
    let finals = latents.narrow(1, last, 1)?;
    let outside = finals.abs()?.gt(range)?.to_dtype(candle_core::DType::F32)?;
    Ok(outside.mean_all()?.to_scalar::<f32>()? as f64)
}

impl UpdateStats {
    fn add(&mut self, loss: f64, kl: f64, clipfrac: f64) {
        self.loss += loss;
        self.approx_kl += kl;
        self.clipfrac += clipfrac;
        self.terms += 1;
    }

    fn finish(mut self) -> Self {
        let n = self.terms.max(1) as f64;
        self.loss /= n;
        self.approx_kl /= n;
        self.clipfrac /= n;
        self.x0_excess /= n;
        self.kl_base /= n;
        self
    }
}

/// Component-wise means of scores, keyed `reward/<name>`.
pub fn component_means(scores: &[Score]) -> BTreeMap<String, f64> {
    let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for s in scores {
        for (k, v) in &s.components {
            let e = sums.entry(format!("reward/{k}")).or_default();
            e.0 += v;
            e.1 += 1;
        }
    }
    sums.into_iter().map(|(k, (s, n))| (k, s / n as f64)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::{NoiseSchedule, ScheduleConfig};

    #[test]
    fn near_deterministic_steps_are_left_out_of_the_policy_gradient() {
        let schedule = NoiseSchedule::new(ScheduleConfig::pixel_default()).unwrap();
        let config = TrainConfig::default();
        assert_eq!(config.sampler.steps, 10);
        // sigma of the 10 steps: 0.91 .. 0.29 for the first eight, then 0.0148 (t = 101 -> 1)
        // and 0.0074 (t = 1 -> 0).
        assert_eq!(config.trained_steps(&schedule).unwrap(), (0..8).collect::<Vec<_>>());
        let all = TrainConfig { min_train_sigma: 0.0, ..TrainConfig::default() };
        assert_eq!(all.trained_steps(&schedule).unwrap().len(), 10);
        let none = TrainConfig { min_train_sigma: 2.0, ..TrainConfig::default() };
        let err = none.trained_steps(&schedule).unwrap_err().to_string();
        assert!(err.contains("leaves none of the 10 sampling steps"), "{err}");
    }
}

/// The variables whose name contains one of `patterns` (all of them for no patterns); a
/// pattern that matches nothing is an error listing what there is to match.
fn select_vars(vars: Vec<(String, Var)>, patterns: &[String]) -> anyhow::Result<Vec<(String, Var)>> {
    if patterns.is_empty() {
        return Ok(vars);
    }
    for p in patterns {
        if !vars.iter().any(|(name, _)| name.contains(p.as_str())) {
            let example = vars.iter().map(|(n, _)| n.as_str()).find(|n| n.contains("attn")).or(vars.first().map(|(n, _)| n.as_str()));
            anyhow::bail!(
                "--train-only {p:?} matches none of the {} trainable weights (names look like {:?}; the text encoder's count only with --train-text-encoder)",
                vars.len(),
                example.unwrap_or("")
            );
        }
    }
    Ok(vars.into_iter().filter(|(name, _)| patterns.iter().any(|p| name.contains(p.as_str()))).collect())
}
