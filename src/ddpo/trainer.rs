//! One DDPO epoch: sample trajectories (rewards computed on a worker pool while the next batch
//! samples), turn rewards into advantages, then update the policy over inner epochs and
//! minibatches with DDPO-IS, DDPO-SF or RWR.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use candle_core::{Tensor, Var};
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use super::advantage::{group_advantages, Normalisation, StatTracker};
use super::config::{Algorithm, ConfigError, TrainConfig};
use super::loss::{ppo_clip_loss, rwr_weights, score_function_loss};
use super::prompts::PromptSource;
use crate::dist::Collectives;
use crate::family::{Family, NoiseRng, NoiseRngState, StepOutput};
use crate::kernels::no_grad::with_no_grad;
use crate::kernels::shards;
use crate::optim::{accumulate, clip_grad_norm, AdamW, Grads};
use crate::reward::{check_finite, Reward, Score};
use crate::sampler::{self, Trajectory};

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
    /// Share of ratios above 1 + clip_range (the update made samples likelier than PPO allows).
    pub clipfrac_high: f64,
    /// Share of ratios below 1 - clip_range.
    pub clipfrac_low: f64,
    /// Mean importance ratio per sampling step (0 = the noisiest) over the epoch's updates; NaN
    /// for the steps not trained. GRPO-Guard's diagnostic: a mean below 1 at low noise is a bias.
    pub ratio_by_step: Vec<f64>,
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
    /// Share of prompt groups whose rewards were all equal (no signal; 0 without groups).
    pub zero_std_ratio: f64,
    pub lr: f64,
    pub optimizer_steps: usize,
    /// Mean gradient norm before clipping over the epoch's optimiser steps (0 without any).
    pub grad_norm: f64,
    pub seconds_sampling: f64,
    pub seconds_reward: f64,
    pub seconds_training: f64,
}

impl EpochReport {
    pub fn rewards(&self) -> Vec<f64> {
        self.scores.iter().map(|s| s.total).collect()
    }
}

/// DDPO training: the policy, its optimiser and the state a checkpoint must hold. Settings
/// change only through [`Trainer::reconfigure`], which validates them against the policy.
pub struct Trainer {
    config: TrainConfig,
    policy: Box<dyn Family>,
    opt: AdamW,
    stats: StatTracker,
    rng: NoiseRng,
    epoch: usize,
    reward: Arc<dyn Reward>,
    prompts: Box<dyn PromptSource>,
    progress: Option<ProgressFn>,
    /// The frozen base model of `kl_weight`.
    base: Option<Box<dyn Family>>,
    /// The process group training this policy together (one process by default).
    dist: Arc<dyn Collectives>,
}

/// The trainer's state besides weights and optimiser moments (saved in a checkpoint).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Epochs completed.
    pub epoch: usize,
    pub rng: NoiseRngState,
    pub stats: StatTracker,
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

/// This process's share of one epoch's samples, flattened over batches: rows `offset..` of
/// the epoch's `global` samples (all of them in one process).
struct Samples {
    offset: usize,
    global: usize,
    prompts: Vec<String>,
    /// (N, steps + 1, C, H, W)
    latents: Tensor,
    /// (N, steps)
    log_probs: Tensor,
    timesteps: Vec<usize>,
}

impl Trainer {
    pub fn new(config: TrainConfig, policy: Box<dyn Family>, reward: Arc<dyn Reward>, prompts: Box<dyn PromptSource>) -> anyhow::Result<Self> {
        config.validate_for(policy.as_ref())?;
        let vars: Vec<_> = policy
            .trainable_vars()
            .into_iter()
            .filter(|(name, _)| config.train_text_encoder || !name.starts_with("text_encoder."))
            .collect();
        anyhow::ensure!(!vars.is_empty(), "the policy has no trainable weights (open it for training)");
        let vars = select_vars(vars, &config.train_only)?;
        let opt = AdamW::new(vars, config.optimizer)?;
        let rng = NoiseRng::new(config.seed);
        let dist = crate::dist::single();
        Ok(Self { config, policy, opt, stats: StatTracker::default(), rng, epoch: 0, reward, prompts, progress: None, base: None, dist })
    }

    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    pub fn policy(&self) -> &dyn Family {
        self.policy.as_ref()
    }

    /// Epochs completed.
    pub fn epoch(&self) -> usize {
        self.epoch
    }

    /// Optimiser steps taken so far in the run.
    pub fn optimizer_steps(&self) -> usize {
        self.opt.step_count()
    }

    /// Replaces the settings (validated against the policy first; on error nothing changes). The
    /// optimiser follows the new learning rate from its next step.
    pub fn reconfigure(&mut self, config: TrainConfig) -> anyhow::Result<()> {
        config.validate_for(self.policy.as_ref())?;
        self.opt.config = config.optimizer;
        self.config = config;
        Ok(())
    }

    /// The trained variables, in optimiser order.
    pub fn trained_vars(&self) -> &[(String, Var)] {
        self.opt.vars()
    }

    /// Optimiser moments and step count as named tensors.
    pub fn optimizer_state(&self) -> candle_core::Result<std::collections::HashMap<String, Tensor>> {
        self.opt.state_tensors()
    }

    /// What a checkpoint holds besides tensors.
    pub fn state(&self) -> TrainerState {
        TrainerState { epoch: self.epoch, rng: self.rng.state(), stats: self.stats.clone() }
    }

    /// Restores a checkpoint: trained weights by name, optimiser state, and the rest.
    pub fn restore(&mut self, weights: &std::collections::HashMap<String, Tensor>, optimizer: &std::collections::HashMap<String, Tensor>, state: TrainerState) -> anyhow::Result<()> {
        for (name, var) in self.opt.vars() {
            let t = weights.get(name).with_context(|| format!("checkpoint lacks weight {name}"))?;
            var.set(t)?;
        }
        self.opt.load_state(optimizer)?;
        self.epoch = state.epoch;
        self.rng = NoiseRng::restore(state.rng);
        self.stats = state.stats;
        Ok(())
    }

    /// Sets the frozen base model that `kl_weight` measures the policy against.
    pub fn set_base(&mut self, base: Box<dyn Family>) {
        self.base = Some(base);
    }

    /// Trains data-parallel in the process group `dist`: each rank samples and scores its share
    /// of every epoch, advantages come from everyone's rewards, and gradients are summed over
    /// ranks before each optimiser step, so N ranks compute the run one process would.
    pub fn set_collectives(&mut self, dist: Arc<dyn Collectives>) {
        self.dist = dist;
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

    /// The reward the epochs are scored with.
    pub fn reward(&self) -> &dyn Reward {
        self.reward.as_ref()
    }

    /// `n` prompts from the run's prompt source, drawn with a generator of their own (`seed`):
    /// the training's random stream is untouched.
    pub fn draw_prompts(&mut self, n: usize, seed: u64) -> anyhow::Result<Vec<String>> {
        let mut rng = NoiseRng::new(seed);
        (0..n).map(|_| self.prompts.next_prompt(rng.rng())).collect()
    }

    /// Replaces the reward (e.g. after a script reload); state is kept.
    pub fn set_reward(&mut self, reward: Arc<dyn Reward>) {
        self.reward = reward;
    }

    /// Samples, scores and trains once. On a bad reward nothing is updated.
    pub fn run_epoch(&mut self) -> anyhow::Result<EpochReport> {
        let epoch = self.epoch;
        let t0 = Instant::now();
        let (samples, all_prompts, scores, images, seconds_reward) =
            self.sample_and_score().with_context(|| format!("epoch {epoch}"))?;
        let seconds_sampling = t0.elapsed().as_secs_f64() - seconds_reward;
        let rewards: Vec<f64> = scores.iter().map(|s| s.total).collect();
        let (adv, zero_std_ratio) = match self.config.normalisation {
            Normalisation::Group { global_std } => {
                let g = group_advantages(&rewards, self.config.group_size, global_std);
                (g.advantages.clone(), g.zero_std_ratio())
            }
            how => (self.stats.advantages(&all_prompts, &rewards, how), 0.0),
        };
        let mine = samples.offset..samples.offset + samples.prompts.len();
        let adv: Vec<f64> = adv[mine].iter().map(|a| a.clamp(-self.config.adv_clip, self.config.adv_clip)).collect();
        let t1 = Instant::now();
        let mut samples = samples;
        if self.config.train_guidance_differs() {
            self.relabel_log_probs(&mut samples).with_context(|| format!("epoch {epoch}: log-probs under the training guidance"))?;
        }
        let update = match self.config.algorithm {
            Algorithm::Is | Algorithm::Sf => self.policy_gradient_update(&samples, &adv),
            Algorithm::Rwr => self.rwr_update(&samples, &adv),
        }
        .with_context(|| format!("epoch {epoch}: policy update"))?;
        self.epoch += 1;
        let out_of_range = match self.policy.pixel_range() {
            Some(range) => self.out_of_range_fraction(&samples.latents, samples.timesteps.len(), range)?,
            None => f64::NAN, // latents have no fixed range
        };
        Ok(EpochReport {
            epoch,
            prompts: all_prompts,
            scores,
            images,
            loss: update.diag.loss,
            approx_kl: update.diag.approx_kl,
            clipfrac: update.diag.clipfrac_high + update.diag.clipfrac_low,
            clipfrac_high: update.diag.clipfrac_high,
            clipfrac_low: update.diag.clipfrac_low,
            ratio_by_step: update.ratio_by_step.iter().map(|&(sum, n)| if n == 0 { f64::NAN } else { sum / n as f64 }).collect(),
            first_ratio_max_dev: update.first_ratio_max_dev,
            x0_excess: update.diag.x0_excess,
            kl_base: update.diag.kl_base,
            out_of_range,
            zero_std_ratio,
            lr: update.lr.unwrap_or_else(|| self.opt.current_lr()),
            optimizer_steps: update.steps,
            grad_norm: update.grad_norm_sum / update.steps.max(1) as f64,
            seconds_sampling,
            seconds_reward,
            seconds_training: t1.elapsed().as_secs_f64(),
        })
    }

    /// Samples this rank's share of the epoch batch by batch; each finished batch goes to the
    /// reward workers while the next one samples. Every rank draws the epoch's prompts, and
    /// sampling batch b draws its noise from stream b of the epoch's key, so which rank samples
    /// a batch changes nothing. Returns this rank's samples, every rank's prompts and scores,
    /// every image (on rank 0; none elsewhere) and the seconds spent waiting for rewards after
    /// sampling finished.
    #[allow(clippy::type_complexity)]
    fn sample_and_score(&mut self) -> anyhow::Result<(Samples, Vec<String>, Vec<Score>, Vec<image::RgbImage>, f64)> {
        let cfg = self.config.clone();
        let groups = (0..cfg.samples_per_epoch / cfg.group_size)
            .map(|_| self.prompts.next_prompt(self.rng.rng()))
            .collect::<anyhow::Result<Vec<_>>>()
            .context("drawing prompts")?;
        let all_prompts: Vec<String> = groups.iter().flat_map(|p| std::iter::repeat_n(p.clone(), cfg.group_size)).collect();
        let (rank, ranks) = (self.dist.rank(), self.dist.size());
        anyhow::ensure!(
            ranks == 1 || all_prompts.len() % (ranks * cfg.sample_batch_size) == 0,
            "samples_per_epoch {} must be a multiple of {ranks} ranks x sample_batch_size {} for the ranks to share an epoch",
            all_prompts.len(),
            cfg.sample_batch_size
        );
        let (per_rank, key) = (all_prompts.len() / ranks, rand::Rng::random::<u64>(self.rng.rng()));
        let offset = rank * per_rank;
        let prompts = all_prompts[offset..offset + per_rank].to_vec();
        let first_batch = offset / cfg.sample_batch_size;
        let shared_start = if cfg.same_noise { cfg.group_size } else { 1 };
        let batches: Vec<&[String]> = prompts.chunks(cfg.sample_batch_size).collect();
        let (job_tx, job_rx) = crossbeam::channel::unbounded::<(usize, Vec<image::RgbImage>, Vec<String>)>();
        let (res_tx, res_rx) = crossbeam::channel::unbounded();
        let policy = self.policy.as_ref();
        let progress = &mut self.progress;
        let total = prompts.len();
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
                let mut rng = NoiseRng::with_stream(key, (first_batch + i) as u64);
                let traj = sampler::sample_grouped(policy, batch, &cfg.sampler, &mut rng, shared_start)?;
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
        let scored = results.into_iter().try_for_each(|(i, batch_scores, batch_images)| -> anyhow::Result<()> {
            let batch_scores = batch_scores.with_context(|| format!("reward {}", reward.name()))?;
            anyhow::ensure!(batch_scores.len() == batch_images.len(), "reward {} returned {} scores for {} images", reward.name(), batch_scores.len(), batch_images.len());
            check_finite(&batch_scores, batches[i], offset + i * cfg.sample_batch_size)?;
            scores.extend(batch_scores);
            images.extend(batch_images);
            Ok(())
        });
        crate::dist::agree(self.dist.as_ref(), scored)?;
        let latents: Vec<Tensor> = trajectories.iter().map(|t| Tensor::stack(&t.latents, 1)).collect::<candle_core::Result<_>>()?;
        let log_probs: Vec<&Tensor> = trajectories.iter().map(|t| &t.log_probs).collect();
        let samples = Samples {
            offset,
            global: all_prompts.len(),
            prompts,
            latents: Tensor::cat(&latents, 0)?,
            log_probs: Tensor::cat(&log_probs, 0)?,
            timesteps: trajectories[0].timesteps.clone(),
        };
        let scores = crate::dist::all_gather_json(self.dist.as_ref(), &scores).context("gathering the ranks' rewards")?.concat();
        let images = gather_images(self.dist.as_ref(), images)?;
        Ok((samples, all_prompts, scores, images, wait))
    }

    /// The share of the final samples' values outside [-range, range], over every rank's samples.
    fn out_of_range_fraction(&self, latents: &Tensor, last: usize, range: f64) -> anyhow::Result<f64> {
        let finals = latents.narrow(1, last, 1)?;
        let mut counts = [sampler::count_out_of_range(&finals, range)?, finals.elem_count() as f64];
        self.dist.all_reduce_sum(&mut counts)?;
        Ok(counts[0] / counts[1].max(1.0))
    }

    /// Recomputes the stored log-probs of the trained steps under the training guidance
    /// (CFG-free training), so the importance ratio starts at 1 and measures how far the updates
    /// moved the policy being trained, not the gap between the guided and the unguided model.
    fn relabel_log_probs(&self, s: &mut Samples) -> anyhow::Result<()> {
        let (policy, cfg) = (self.policy.as_ref(), self.config.train_sampler());
        let steps = self.config.trained_steps(policy)?;
        let n = s.prompts.len();
        let steps_total = s.timesteps.len();
        let mut log_probs = s.log_probs.flatten_all()?.to_vec1::<f32>()?;
        for start in (0..n).step_by(self.config.sample_batch_size) {
            let len = self.config.sample_batch_size.min(n - start);
            let rows = s.latents.narrow(0, start, len)?;
            let prompts = &s.prompts[start..start + len];
            for &k in &steps {
                let (x_t, x_prev) = (rows.narrow(1, k, 1)?.squeeze(1)?, rows.narrow(1, k + 1, 1)?.squeeze(1)?);
                let timesteps = vec![s.timesteps[k]; len];
                let step = with_no_grad(|| sampler::transition(policy, prompts, &x_t, &x_prev, &timesteps, &cfg))?;
                for (i, lp) in step.log_prob.to_vec1::<f32>()?.into_iter().enumerate() {
                    log_probs[(start + i) * steps_total + k] = lp;
                }
            }
        }
        s.log_probs = Tensor::from_vec(log_probs, (n, steps_total), policy.device())?;
        Ok(())
    }

    /// DDPO-IS / DDPO-SF over inner epochs, minibatches and (a random subset of) timesteps.
    fn policy_gradient_update(&mut self, s: &Samples, adv: &[f64]) -> anyhow::Result<UpdateStats> {
        let cfg = self.config.clone();
        let n = s.global;
        let eligible = cfg.trained_steps(self.policy.as_ref())?;
        let k = cfg.train_steps(eligible.len());
        let sf = cfg.algorithm == Algorithm::Sf;
        let inner = if sf { 1 } else { cfg.inner_epochs };
        let minibatches = n.div_ceil(cfg.train_batch_size);
        let accum = if sf { minibatches } else { cfg.grad_accum };
        let mut stats = UpdateStats::new(cfg.sampler.steps);
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
            for global_mb in order.chunks(cfg.train_batch_size) {
                // Every rank walks the same global minibatches and trains on the rows it holds,
                // weighted by their share, so the ranks' gradients sum to the minibatch's.
                let mb: Vec<usize> = global_mb.iter().filter_map(|&i| i.checked_sub(s.offset)).filter(|&i| i < s.prompts.len()).collect();
                let share = mb.len() as f64 / global_mb.len() as f64;
                for j in 0..k {
                    let ks: Vec<usize> = mb.iter().map(|&i| step_order[i + s.offset][j]).collect();
                    if !mb.is_empty() {
                        let terms = self.minibatch_grads(s, &mb, &ks, adv)?;
                        if stats.terms == 0 {
                            stats.first_ratio_max_dev = terms.ratio_dev;
                        }
                        // Each shard into the running sum (not shards summed first): the same
                        // additions, in the same order, as the runs in RESULTS.md.
                        for g in &terms.grads {
                            accumulate(&mut grads, &self.opt.collect(g), share / (k * accum) as f64)?;
                        }
                        for (&k, &ratio) in ks.iter().zip(&terms.ratios) {
                            let slot = &mut stats.ratio_by_step[k];
                            (slot.0, slot.1) = (slot.0 + ratio, slot.1 + 1);
                        }
                        stats.diag.add_scaled(&terms.diag, share);
                    }
                    stats.terms += 1;
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
        stats.all_reduce(self.dist.as_ref())?;
        Ok(stats.finish())
    }

    /// Gradients and diagnostics of one minibatch at one trajectory step per sample, computed
    /// in one shard per CPU core ([`crate::kernels::shards`]): each shard's loss is weighted by
    /// its share of the minibatch, so the shards' gradients sum to the minibatch's.
    fn minibatch_grads(&self, s: &Samples, mb: &[usize], ks: &[usize], adv: &[f64]) -> anyhow::Result<MinibatchGrads> {
        let (policy, base, config) = (self.policy.as_ref(), self.base.as_deref(), &self.config);
        let parts = shards::sharded_backward(mb.len(), policy.device(), |r| -> anyhow::Result<_> {
            let terms = transition_loss(policy, base, config, s, &mb[r.clone()], &ks[r], adv)?;
            Ok((terms.loss.clone(), terms))
        })?;
        let mut out = MinibatchGrads::default();
        for part in parts {
            let (share, terms) = (part.share, part.extra);
            out.diag.add_scaled(&terms.diag, share);
            out.ratio_dev = out.ratio_dev.max(terms.ratio_dev);
            out.ratios.extend(terms.ratios);
            out.grads.push(part.grads);
        }
        Ok(out)
    }

    /// RWR: the DDPM denoising loss on the epoch's own samples, weighted by softmax(A / beta).
    fn rwr_update(&mut self, s: &Samples, adv: &[f64]) -> anyhow::Result<UpdateStats> {
        anyhow::ensure!(self.dist.size() == 1, "RWR trains in one process only (its denoising noise is not split across ranks); use DDPO-IS or SF with several ranks");
        let cfg = self.config.clone();
        let n = s.prompts.len();
        let weights = rwr_weights(adv, cfg.rwr_beta);
        let last = cfg.sampler.steps;
        let device = self.policy.device().clone();
        let mut stats = UpdateStats::new(cfg.sampler.steps);
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
                    let per_sample = self.policy.denoising_loss(&x0, &prompts, &mut self.rng)?;
                    let loss = (per_sample * &w)?.mean_all()?;
                    let g = self.opt.collect(&loss.backward()?);
                    accumulate(&mut grads, &g, 1.0 / (k * cfg.grad_accum) as f64)?;
                    stats.add(&Diagnostics { loss: loss.to_scalar::<f32>()? as f64, ..Default::default() });
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
        crate::dist::all_reduce_grads(self.dist.as_ref(), grads, self.opt.vars())?;
        let norm = clip_grad_norm(grads, self.config.grad_clip)?;
        anyhow::ensure!(norm.is_finite(), "gradient norm is {norm}; the update was skipped and the weights are unchanged");
        stats.grad_norm_sum += norm;
        stats.lr = Some(self.opt.current_lr());
        self.opt.step(grads)?;
        grads.clear();
        stats.steps += 1;
        Ok(())
    }
}

/// The update's diagnostics: one minibatch-step's, or their running sum or mean.
#[derive(Debug, Default, Clone)]
struct Diagnostics {
    loss: f64,
    approx_kl: f64,
    clipfrac_high: f64,
    clipfrac_low: f64,
    /// The range penalty's term before its weight.
    x0_excess: f64,
    /// KL of the trained transitions to the reference's.
    kl_base: f64,
}

impl Diagnostics {
    fn add_scaled(&mut self, other: &Self, weight: f64) {
        self.loss += weight * other.loss;
        self.approx_kl += weight * other.approx_kl;
        self.clipfrac_high += weight * other.clipfrac_high;
        self.clipfrac_low += weight * other.clipfrac_low;
        self.x0_excess += weight * other.x0_excess;
        self.kl_base += weight * other.kl_base;
    }
}

/// Running means of the update's diagnostics.
#[derive(Debug)]
struct UpdateStats {
    diag: Diagnostics,
    terms: usize,
    steps: usize,
    first_ratio_max_dev: f64,
    /// (sum of ratios, count) per sampling step.
    ratio_by_step: Vec<(f64, usize)>,
    /// The learning rate of the last optimiser step (warm-up included).
    lr: Option<f64>,
    /// Sum of the optimiser steps' gradient norms before clipping.
    grad_norm_sum: f64,
}

/// Loss of a minibatch at one trajectory step per sample (`ks[i]` for sample `mb[i]`), with
/// its diagnostics.
fn transition_loss(policy: &dyn Family, base: Option<&dyn Family>, config: &TrainConfig, s: &Samples, mb: &[usize], ks: &[usize], adv: &[f64]) -> anyhow::Result<TransitionLoss> {
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
    let device = policy.device();
    let old = Tensor::from_vec(old, mb.len(), device)?;
    let a = Tensor::from_vec(mb.iter().map(|&i| adv[i] as f32).collect::<Vec<_>>(), mb.len(), device)?;
    let train_sampler = config.train_sampler();
    let step = sampler::transition(policy, &prompts, &x_t, &x_prev, &timesteps, &train_sampler)?;
    let new = &step.log_prob;
    let l = match config.algorithm {
        Algorithm::Sf => score_function_loss(new, &old, &a)?,
        _ => ppo_clip_loss(new, &old, &a, config.clip_range)?,
    };
    let ratios: Vec<f64> = l.ratio.to_vec1::<f32>()?.into_iter().map(f64::from).collect();
    let ratio_dev = ratios.iter().map(|r| (r - 1.0).abs()).fold(0.0, f64::max);
    let (mut loss, mut x0_excess, mut kl_base) = (l.loss, 0.0, 0.0);
    if config.range_penalty > 0.0 {
        let range = policy.pixel_range().context("the range penalty needs a pixel-space family")?;
        let weights: Vec<f32> = timesteps.iter().map(|&t| policy.x0_weight(t) as f32).collect();
        let weights = Tensor::from_vec(weights, mb.len(), device)?;
        let excess = range_excess(&step.pred_original, range, &weights)?;
        x0_excess = excess.to_scalar::<f32>()? as f64;
        loss = (loss + (excess * config.range_penalty)?)?;
    }
    if config.kl_weight > 0.0 {
        let base_step = if policy.has_own_reference() {
            policy.reference_log_prob(&prompts, &x_t, &x_prev, &timesteps, &train_sampler)?
        } else {
            let base = base.context("kl_weight needs the base model (Trainer::set_base)")?;
            sampler::transition(base, &prompts, &x_t, &x_prev, &timesteps, &train_sampler)?
        };
        let kl = kl_to_base(&step, &base_step)?;
        kl_base = kl.to_scalar::<f32>()? as f64;
        loss = (loss + (kl * config.kl_weight)?)?;
    }
    let diag = Diagnostics {
        loss: loss.to_scalar::<f32>()? as f64,
        approx_kl: l.approx_kl,
        clipfrac_high: l.clipfrac_high,
        clipfrac_low: l.clipfrac_low,
        x0_excess,
        kl_base,
    };
    Ok(TransitionLoss { loss, diag, ratio_dev, ratios })
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
    diag: Diagnostics,
    ratio_dev: f64,
    /// The importance ratio of each sample of the minibatch, in order.
    ratios: Vec<f64>,
}

/// One minibatch-step's loss and diagnostics.
struct TransitionLoss {
    loss: Tensor,
    diag: Diagnostics,
    /// max |ratio - 1| over the minibatch.
    ratio_dev: f64,
    ratios: Vec<f64>,
}

/// mean_i(w_i * mean(relu(|x_i| - range)^2)) over the batch rows x_i: zero inside the range,
/// growing smoothly outside it.
pub fn range_excess(x: &Tensor, range: f64, weights: &Tensor) -> candle_core::Result<Tensor> {
    let per_row = x.abs()?.affine(1.0, -range)?.relu()?.sqr()?.flatten_from(1)?.mean(1)?;
    (per_row * weights)?.mean_all()
}

impl UpdateStats {
    fn new(sampling_steps: usize) -> Self {
        Self { diag: Diagnostics::default(), terms: 0, steps: 0, first_ratio_max_dev: 0.0, ratio_by_step: vec![(0.0, 0); sampling_steps], lr: None, grad_norm_sum: 0.0 }
    }

    fn add(&mut self, diag: &Diagnostics) {
        self.diag.add_scaled(diag, 1.0);
        self.terms += 1;
    }

    /// Sums the ranks' diagnostics and ratios (each rank added its rows' share) and takes the
    /// largest first-minibatch ratio deviation.
    fn all_reduce(&mut self, dist: &dyn Collectives) -> anyhow::Result<()> {
        if dist.size() == 1 {
            return Ok(());
        }
        let d = &mut self.diag;
        let mut values = vec![d.loss, d.approx_kl, d.clipfrac_high, d.clipfrac_low, d.x0_excess, d.kl_base];
        values.extend(self.ratio_by_step.iter().flat_map(|&(sum, n)| [sum, n as f64]));
        dist.all_reduce_sum(&mut values).context("all-reduce of the update's diagnostics")?;
        [d.loss, d.approx_kl, d.clipfrac_high, d.clipfrac_low, d.x0_excess, d.kl_base] = values[..6].try_into().expect("six diagnostics");
        for (slot, pair) in self.ratio_by_step.iter_mut().zip(values[6..].chunks(2)) {
            *slot = (pair[0], pair[1] as usize);
        }
        let devs = crate::dist::all_gather_json(dist, &self.first_ratio_max_dev)?;
        self.first_ratio_max_dev = devs.into_iter().fold(0.0, f64::max);
        Ok(())
    }

    fn finish(mut self) -> Self {
        let sum = std::mem::take(&mut self.diag);
        self.diag.add_scaled(&sum, 1.0 / self.terms.max(1) as f64);
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

/// The variables whose name contains one of `patterns` (all of them for no patterns); a
/// pattern that matches nothing is an error listing what there is to match.
fn select_vars(vars: Vec<(String, Var)>, patterns: &[String]) -> anyhow::Result<Vec<(String, Var)>> {
    if patterns.is_empty() {
        return Ok(vars);
    }
    for p in patterns {
        if !vars.iter().any(|(name, _)| name.contains(p.as_str())) {
            let example = vars.iter().map(|(n, _)| n.as_str()).find(|n| n.contains("attn")).or(vars.first().map(|(n, _)| n.as_str()));
            return Err(ConfigError {
                field: "train_only",
                problem: format!(
                    "{p:?} matches none of the {} trainable weights (names look like {:?}; the text encoder's count only when it is trained)",
                    vars.len(),
                    example.unwrap_or("")
                ),
            }
            .into());
        }
    }
    Ok(vars.into_iter().filter(|(name, _)| patterns.iter().any(|p| name.contains(p.as_str()))).collect())
}

/// Every rank's images on rank 0, in rank order (each as width, height and RGB bytes); the other
/// ranks keep none (only rank 0 writes the run folder).
fn gather_images(dist: &dyn Collectives, images: Vec<image::RgbImage>) -> anyhow::Result<Vec<image::RgbImage>> {
    if dist.size() == 1 {
        return Ok(images);
    }
    let mut bytes = Vec::new();
    for img in &images {
        bytes.extend(img.width().to_le_bytes());
        bytes.extend(img.height().to_le_bytes());
        bytes.extend_from_slice(img.as_raw());
    }
    let Some(parts) = dist.gather(&bytes).context("gathering the ranks' images")? else { return Ok(Vec::new()) };
    let mut all = Vec::new();
    for part in parts {
        let mut rest = part.as_slice();
        while rest.len() >= 8 {
            let (w, h) = (u32::from_le_bytes(rest[..4].try_into()?), u32::from_le_bytes(rest[4..8].try_into()?));
            let len = (w * h * 3) as usize;
            let raw = rest.get(8..8 + len).context("a gathered image is cut short")?;
            all.push(image::RgbImage::from_raw(w, h, raw.to_vec()).context("a gathered image of the wrong size")?);
            rest = &rest[8 + len..];
        }
    }
    Ok(all)
}
