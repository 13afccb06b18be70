//! `ddpo pretrain diffusion`: DDPM pretraining of the embedded default policy, resumable.
//! The reward models' subcommands live in [`super::pretrain_rewards`].

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use anyhow::Context;


use super::progress::StepProgress;
use crate::pretrain::{Event, PretrainConfig, Pretrainer};

#[derive(Debug, clap::Subcommand)]
pub enum Which {
    /// Train the text-conditioned diffusion model (UNet + text encoder) with the DDPM objective.
    Diffusion(DiffusionArgs),
    /// Train the small shapes-world CLIP contrastively (the default `clip_similarity` model).
    Clip(super::pretrain_rewards::ClipArgs),
    /// Fit the aesthetic head (LAION MLP family) on the small CLIP's embeddings to the
    /// shapes world's composition score.
    Aesthetic(super::pretrain_rewards::AestheticArgs),
}

#[derive(Debug, clap::Args)]
pub struct DiffusionArgs {
    /// Run folder (checkpoints, EMA weights, sample grids).
    #[arg(long, default_value = "runs/pretrain-diffusion")]
    out: PathBuf,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    resume: bool,
    /// Total optimiser steps (on --resume: extends or shortens the plan).
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Architecture of a new run: a preset (v1: the first shipped default's UNet; v2: wider,
    /// attention at 16x16, never shipped; v3: v1 with attention at 16x16, v-prediction; v4: v3
    /// with the pooled caption added to the timestep embedding) or a
    /// policy config JSON file (as written beside every model's weights).
    #[arg(long, default_value = "v1")]
    arch: String,
    /// Train a rectified flow instead (the flow family: the UNet predicts the velocity
    /// eps - x0, sampled with Flow-GRPO's SDE step), on sigmas shifted by this (SD3.5: 3).
    #[arg(long, value_name = "SHIFT")]
    flow_shift: Option<f64>,
    /// What the UNet predicts: `epsilon` (the noise, as v1) or `v` (v-prediction, as Stable
    /// Diffusion 2: the estimate of x0 stays bounded at high noise, so unclamped samples stay in
    /// range). Not with --flow-shift: a flow model predicts its velocity.
    #[arg(long, value_enum, conflicts_with = "flow_shift")]
    prediction: Option<Prediction>,
    /// Start from this model's weights instead of random ones, e.g. models/shapes-unet.safetensors
    /// to retrain the shipped model for v-prediction. The model may lack some of --arch's
    /// attention blocks (attention added at another resolution) or its pooled-caption embedding
    /// (v4): those start as the identity.
    #[arg(long, value_name = "MODEL")]
    init_from: Option<PathBuf>,
    /// Initialise the text encoder from this shapes CLIP's text tower (e.g.
    /// models/shapes-clip.safetensors; its text architecture replaces --arch's) and keep it
    /// frozen, as Stable Diffusion keeps its CLIP.
    #[arg(long, value_name = "CLIP")]
    text_encoder: Option<PathBuf>,
    /// With --text-encoder: train the initialised text encoder along with the UNet.
    #[arg(long, requires = "text_encoder")]
    tune_text_encoder: bool,
    /// Steps between checkpoints.
    #[arg(long, default_value_t = 250)]
    checkpoint_every: usize,
    /// Steps between sample grids (0: never).
    #[arg(long, default_value_t = 1000)]
    sample_every: usize,
    /// Also write the final EMA policy here (e.g. models/shapes-unet.safetensors).
    #[arg(long)]
    export: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// `--prediction`: what the UNet learns to output.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Prediction {
    /// The noise (diffusers' `epsilon`).
    Epsilon,
    /// v = sqrt(ab) eps - sqrt(1 - ab) x0 (diffusers' `v_prediction`).
    V,
}

/// The policy config named by `--arch`.
fn architecture(arch: &str) -> anyhow::Result<crate::family::PolicyConfig> {
    match arch {
        "v1" => Ok(crate::family::PolicyConfig::shapes_default()),
        "v2" => Ok(crate::family::PolicyConfig::shapes_v2()),
        "v3" => Ok(crate::family::PolicyConfig::shapes_v3()),
        "v4" => Ok(crate::family::PolicyConfig::shapes_v4()),
        path => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--arch {path}: not a preset (v1, v2, v3, v4) nor a readable policy config JSON"))?;
            serde_json::from_str(&text).with_context(|| format!("--arch {path}: not a policy config"))
        }
    }
}

pub fn exec(which: Which) -> anyhow::Result<()> {
    let args = match which {
        Which::Diffusion(args) => args,
        Which::Clip(args) => return super::pretrain_rewards::exec_clip(args),
        Which::Aesthetic(args) => return super::pretrain_rewards::exec_aesthetic(args),
    };
    let device = super::device(&args.device)?;
    let mut run = if args.resume {
        Pretrainer::resume(&args.out, args.steps, &device)?
    } else {
        let defaults = PretrainConfig::default();
        let mut policy = crate::family::PolicyConfig { flow_shift: args.flow_shift, ..architecture(&args.arch)? };
        match args.prediction {
            Some(Prediction::Epsilon) => policy.scheduler.prediction_type = "epsilon".into(),
            Some(Prediction::V) => {
                policy.scheduler.prediction_type = "v_prediction".into();
                // v keeps x0's estimate bounded, which is what the clamp stands in for; the
                // model samples unclamped, as DDPO trains it.
                policy.scheduler.clip_sample = false;
            }
            None => {}
        }
        let config = PretrainConfig {
            steps: args.steps.unwrap_or(defaults.steps),
            batch_size: args.batch_size,
            lr: args.lr,
            seed: args.seed,
            checkpoint_every: args.checkpoint_every,
            sample_every: args.sample_every,
            policy,
            init_from: args.init_from,
            freeze_text_encoder: args.text_encoder.is_some() && !args.tune_text_encoder,
            text_encoder_from: args.text_encoder,
            ..defaults
        };
        Pretrainer::create(config, &args.out, &device).map_err(super::flag_error)?
    };
    eprintln!(
        "pretraining {} parameters in {} from step {} to {}",
        run.policy.parameter_count(),
        args.out.display(),
        run.step,
        run.config.steps
    );
    let mut progress = StepProgress::new(run.config.steps, run.step);
    let stop = super::interrupt_flag();
    let mut on_event = |e: Event| match e {
        Event::Step { step, loss, lr, grad_norm } => progress.step(step, loss, &format!("lr {lr:.1e} |g| {grad_norm:.2}")),
        Event::Checkpoint { step, path } => progress.checkpoint(step, &path),
        Event::Samples { step, path, conditioning: c, attributes } => super::say(
            &progress.bar,
            format!(
                "step {step}: samples {}; EMA denoising loss with own captions {:.5}, others' {:.5}, none {:.5}: the caption removes {:.1}% of it; one word changed: {}",
                path.display(),
                c.own,
                c.shuffled,
                c.empty,
                100.0 * c.gap(),
                attributes.iter().map(|(a, g)| format!("{} {:.1}%", a.name(), 100.0 * g)).collect::<Vec<_>>().join(", ")
            ),
        ),
    };
    run.run(&mut on_event, &|| stop.load(Ordering::SeqCst))?;
    progress.bar.finish();
    if let Some(export) = &args.export {
        if run.step >= run.config.steps {
            run.export(export)?;
            eprintln!("exported the EMA policy to {}", export.display());
        }
    }
    Ok(())
}
