//! `ddpo pretrain clip` and `ddpo pretrain aesthetic`: the shipped reward models of the shapes
//! world (the small CLIP, then the aesthetic head on its embeddings).

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use super::progress::StepProgress;

use crate::pretrain::clip::{eval_samples, zero_shot, ClipEvent, ClipTrainConfig, ClipTrainer};

#[derive(Debug, clap::Args)]
pub struct ClipArgs {
    /// Run folder (checkpoints and the current weights as clip.safetensors).
    #[arg(long, default_value = "runs/pretrain-clip")]
    out: PathBuf,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    resume: bool,
    /// Total optimiser steps (on --resume: extends or shortens the plan).
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long, default_value_t = 96)]
    batch_size: usize,
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Steps between checkpoints.
    #[arg(long, default_value_t = 100)]
    checkpoint_every: usize,
    /// Held-out images of the zero-shot evaluation printed at the end (0: skip it).
    #[arg(long, default_value_t = 1000)]
    eval_images: usize,
    /// Also write the final weights here (e.g. models/shapes-clip.safetensors, + .json).
    #[arg(long)]
    export: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn exec_clip(args: ClipArgs) -> anyhow::Result<()> {
    let device = super::device(&args.device)?;
    let mut run = if args.resume {
        ClipTrainer::resume(&args.out, args.steps, &device)?
    } else {
        let defaults = ClipTrainConfig::default();
        let config = ClipTrainConfig {
            steps: args.steps.unwrap_or(defaults.steps),
            batch_size: args.batch_size,
            lr: args.lr,
            seed: args.seed,
            checkpoint_every: args.checkpoint_every,
            ..defaults
        };
        ClipTrainer::create(config, &args.out, &device).map_err(super::flag_error)?
    };
    eprintln!("training the shapes CLIP in {} from step {} to {}", args.out.display(), run.step, run.config.steps);
    let mut progress = StepProgress::new(run.config.steps, run.step);
    let stop = super::interrupt_flag();
    let mut on_event = |e: ClipEvent| match e {
        ClipEvent::Step { step, loss, lr, temperature } => progress.step(step, loss, &format!("lr {lr:.1e} T {temperature:.4}")),
        ClipEvent::Checkpoint { step, path } => progress.checkpoint(step, &path),
    };
    run.run(&mut on_event, &|| stop.load(Ordering::SeqCst))?;
    progress.bar.finish();
    if run.step >= run.config.steps {
        if let Some(export) = &args.export {
            run.export(export)?;
            eprintln!("exported the shapes CLIP to {}", export.display());
        }
        if args.eval_images > 0 {
            let report = zero_shot(&run.model, &eval_samples(&run.model, args.eval_images)?)?;
            println!("{}", serde_json::to_string(&report)?);
        }
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct AestheticArgs {
    /// The small CLIP whose image embeddings the head reads.
    #[arg(long, default_value = crate::reward::models::DEFAULT_CLIP)]
    clip: PathBuf,
    /// Where to write the head (+ .json).
    #[arg(long, default_value = crate::reward::models::DEFAULT_AESTHETIC)]
    out: PathBuf,
    #[arg(long, default_value_t = 8192)]
    train_images: usize,
    #[arg(long, default_value_t = 1024)]
    eval_images: usize,
    #[arg(long, default_value_t = 3000)]
    steps: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn exec_aesthetic(args: AestheticArgs) -> anyhow::Result<()> {
    use crate::pretrain::aesthetic::{save_head, train_head, AestheticHeadConfig, AestheticTrainConfig};
    let device = super::device(&args.device)?;
    let clip_path = super::resolve_model(&args.clip);
    let clip = crate::reward::shapes_clip::ShapesClip::load(&clip_path, &device)?;
    let cfg = AestheticTrainConfig {
        train_images: args.train_images,
        eval_images: args.eval_images,
        steps: args.steps,
        lr: args.lr,
        seed: args.seed,
        ..Default::default()
    };
    eprintln!("embedding {} + {} shapes-world images with {}", cfg.train_images, cfg.eval_images, clip_path.display());
    let bar = StepProgress::new(cfg.steps, 0).bar;
    let (_, varmap, report) = train_head(&clip, &cfg, &mut |step, loss| {
        bar.set_position(step as u64 + 1);
        bar.set_message(format!("mse {loss:.4}"));
        if bar.is_hidden() && step % 500 == 0 {
            eprintln!("step {step}: mse {loss:.4}");
        }
    })?;
    bar.finish();
    let clip_name = clip_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let head = AestheticHeadConfig {
        input_dim: clip.config().embed_dim,
        clip: clip_name,
        target: "shapes-world composition score v1 (src/world/composition.rs), 0..10".into(),
        train: cfg,
    };
    save_head(&varmap, &head, &args.out)?;
    eprintln!("wrote {}", args.out.display());
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
