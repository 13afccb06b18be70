//! `ddpo eval`: how well a model follows shapes-world prompts, per attribute; with `--clip`,
//! the small CLIP's zero-shot accuracy per attribute instead.

use std::path::PathBuf;

use crate::policy::Policy;
use crate::pretrain::eval::prompt_following;
use crate::world::{ShapesWorld, WorldConfig};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model weights (.safetensors with its .json config beside it).
    #[arg(long, default_value = super::DEFAULT_MODEL)]
    model: PathBuf,
    /// Number of prompts drawn from the caption grammar.
    #[arg(short = 'n', long, default_value_t = 200)]
    n: usize,
    #[command(flatten)]
    sampler: super::SamplerArgs,
    /// Seed of the prompt draw.
    #[arg(long, default_value_t = 2024)]
    prompt_seed: u64,
    /// Seed of the sampler noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Evaluate a small shapes CLIP instead (zero-shot caption choice on -n held-out images,
    /// per attribute; e.g. models/shapes-clip.safetensors).
    #[arg(long)]
    clip: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn exec(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.n > 0, "-n must be at least 1");
    let device = super::device(&args.device)?;
    if let Some(clip) = &args.clip {
        use crate::pretrain::clip::{eval_samples, zero_shot};
        let model = crate::reward::shapes_clip::ShapesClip::load(&super::resolve_model(clip), &device)?;
        let report = zero_shot(&model, &eval_samples(&model, args.n)?)?;
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let policy = Policy::load(&super::resolve_model(&args.model), &device)?;
    let cfg = args.sampler.config(policy.schedule.num_train_timesteps())?;
    let world = ShapesWorld::new(WorldConfig { size: policy.config.image_size as u32, ..Default::default() })?;
    let r = prompt_following(&policy, &world, args.n, &cfg, args.prompt_seed, args.seed)?;
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}
