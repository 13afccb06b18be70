//! The command line: clap subcommands (one file each), progress bars and user-facing errors.
//! This is the only module that prints; `main.rs` just calls [`run`].

mod bench;
mod check;
mod eval;
mod experiment;
mod pretrain;
pub mod repl;
mod pretrain_rewards;
mod progress;
mod sample;
mod scripts;
mod selftest;
mod train;
mod vlm;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// Reinforcement-learning finetuning of diffusion models (DDPO), CPU-first.
#[derive(Debug, Parser)]
#[command(name = "ddpo", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Show internal backtraces under errors (for bug reports).
    #[arg(long, global = true)]
    debug: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Finetune a diffusion model on a reward with DDPO (the main job).
    Train(train::Args),
    /// Sample images for a prompt and write a labelled grid PNG.
    Sample(sample::Args),
    /// Pretrain the embedded default models on the shapes world.
    #[command(subcommand)]
    Pretrain(pretrain::Which),
    /// Measure how well a model follows shapes-world prompts (pixel-level judge).
    Eval(eval::Args),
    /// Time fixed workloads on the default configuration and print a JSON report.
    Bench(bench::Args),
    /// Compile and dry-run Rhai reward/prompt/hooks scripts; prints ok or file:line:col: message.
    Check(check::Args),
    /// Interactive Rhai session with the model and scripts loaded: sample, score, show, train.
    Repl(repl::Args),
    /// Recompute the golden reference outputs on a device and dtype; one line per check.
    Selftest(selftest::Args),
    /// Run an experiment script's runs (resuming where it stopped) and write its table and curves.
    Experiment(experiment::Args),
    /// Serve a test vision-language model on 127.0.0.1 (OpenAI-compatible; it answers from the
    /// shapes world) for `--vlm`.
    VlmServer(vlm::ServerArgs),
}

/// Parses the command line and runs the chosen subcommand.
pub fn run() -> anyhow::Result<()> {
    // `--lr -1` is a value to refuse with a reason, not an unknown flag.
    let command = Cli::command().mut_subcommands(|s| s.allow_negative_numbers(true));
    let cli = Cli::from_arg_matches(&command.get_matches()).unwrap_or_else(|e| e.exit());
    match cli.command {
        Command::Train(args) => train::exec(args),
        Command::Sample(args) => sample::exec(args),
        Command::Pretrain(which) => pretrain::exec(which),
        Command::Eval(args) => eval::exec(args),
        Command::Bench(args) => bench::exec(args),
        Command::Check(args) => check::exec(args),
        Command::Repl(args) => repl::exec(args),
        Command::Selftest(args) => selftest::exec(args),
        Command::Experiment(args) => experiment::exec(args),
        Command::VlmServer(args) => vlm::exec(args),
    }
}

/// The shipped default model, found relative to the working directory or the source checkout.
pub const DEFAULT_MODEL: &str = "models/shapes-unet.safetensors";

/// Resolves a model path: as given, or (for the default) inside the crate's checkout.
fn resolve_model(path: &Path) -> PathBuf {
    if path.exists() || path.is_absolute() {
        return path.to_path_buf();
    }
    let in_checkout = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    if in_checkout.exists() {
        in_checkout
    } else {
        path.to_path_buf()
    }
}

/// Opens a resolved model for sampling and says what it loaded.
fn open_model(source: &crate::run::ModelSource, options: &crate::family::OpenOptions, device: &candle_core::Device) -> anyhow::Result<Box<dyn crate::family::Family>> {
    let policy = crate::family::open_frozen(&source.model, source.weights.as_deref(), options, device)?;
    eprintln!("loaded {source}");
    Ok(policy)
}

/// The compute device named on the command line: `cpu`, `cuda` (GPU 0; in a data-parallel run,
/// the GPU of the rank's place on its machine) or `cuda:N`.
fn device(name: &str) -> anyhow::Result<candle_core::Device> {
    let cuda = |ordinal: usize| {
        candle_core::Device::new_cuda(ordinal).map_err(|e| {
            anyhow::anyhow!("cannot open CUDA device {ordinal} ({e}); build with `--features cuda` on a machine with a GPU, or use --device cpu")
        })
    };
    match name {
        "cpu" => Ok(candle_core::Device::Cpu),
        "cuda" => cuda(crate::dist::local_rank()),
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(ordinal) => cuda(ordinal),
            None => anyhow::bail!("unknown --device {other:?} (use cpu, cuda or cuda:N)"),
        },
    }
}

/// A flag set by Ctrl-C, so long jobs can checkpoint and stop cleanly.
fn interrupt_flag() -> Arc<AtomicBool> {
    interrupt_flag_with("\ninterrupted: finishing the current step and writing a checkpoint (Ctrl-C again to abort)")
}

/// A flag set by Ctrl-C, which prints `message`; a second Ctrl-C while it is set exits.
fn interrupt_flag_with(message: &'static str) -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    // A second handler cannot be installed (e.g. in tests); then Ctrl-C simply kills the process.
    let _ = ctrlc::set_handler(move || {
        if f.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("{message}");
    });
    flag
}

/// Checks that an output path names a PNG file in an existing folder.
fn check_png_path(path: &Path) -> anyhow::Result<()> {
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    anyhow::ensure!(ext.as_deref() == Some("png"), "--out {} must end in .png", path.display());
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        anyhow::ensure!(dir.is_dir(), "--out {}: folder {} does not exist", path.display(), dir.display());
    }
    Ok(())
}

/// Prints a line above the progress bar, or plainly when the bar is hidden (not a terminal).
fn say(bar: &indicatif::ProgressBar, line: String) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

/// The DDIM sampler flags shared by every command that samples.
#[derive(Debug, Clone, clap::Args)]
pub struct SamplerArgs {
    /// DDIM steps (default: 20 for `sample` and `eval`, 10 for `train`, where fewer, larger
    /// steps give a less noisy policy gradient and twice the epochs per hour on a CPU).
    #[arg(long)]
    pub steps: Option<usize>,
    /// DDIM stochasticity (1.0 = DDPM-like, as DDPO uses), or a flow model's SDE noise level
    /// (0.7 as Flow-GRPO trains; 0 = the ODE). Default 1, except that `sample` and `eval` on a
    /// flow model integrate its ODE (0), as SD3 and Flow-GRPO evaluate.
    #[arg(long)]
    pub eta: Option<f64>,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = crate::family::SamplerConfig::default().guidance)]
    pub guidance: f64,
    /// Clamp the predicted x0 to [-1, 1] inside each step (diffusers' `clip_sample`). Default:
    /// the model's scheduler setting for `sample` and `eval` (off for the shipped v-prediction
    /// model, on for eps models such as models/pretrain/ema.safetensors), off for `train`: the
    /// clamp makes the policy non-smooth at exactly the saturated palette colours (most pixels
    /// of a shapes-world image), and DDPO then trains in the wrong direction.
    #[arg(long, value_name = "BOOL")]
    pub clip_sample: Option<bool>,
    /// A flow model's step (Flow-GRPO's `sde_type`), at noise level --eta: `sde`, or `cps`
    /// (coefficients-preserving; --eta 0.8 as Flow-GRPO's CPS runs).
    #[arg(long, value_enum, default_value = "sde")]
    pub sde_type: SdeType,
}

/// `--sde-type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SdeType {
    Sde,
    Cps,
}

impl SamplerArgs {
    /// The sampler settings, `defaults`' steps and eta where --steps and --eta are left out (not
    /// yet validated).
    pub fn settings(&self, defaults: &crate::family::SamplerConfig) -> crate::family::SamplerConfig {
        let flow_step = match self.sde_type {
            SdeType::Sde => crate::family::FlowStep::Sde,
            SdeType::Cps => crate::family::FlowStep::Cps,
        };
        let (steps, eta) = (self.steps.unwrap_or(defaults.steps), self.eta.unwrap_or(defaults.eta));
        crate::family::SamplerConfig { flow_step, ..crate::family::SamplerConfig::new(steps, eta, self.guidance) }
    }

    /// The sampler settings for evaluating `family` (its [`Family::eval_sampler`] where a flag
    /// is left out), validated.
    pub fn config(&self, family: &dyn crate::family::Family) -> anyhow::Result<crate::family::SamplerConfig> {
        let cfg = self.settings(&family.eval_sampler());
        family.check_sampler(&cfg).map_err(flag_error)?;
        Ok(cfg)
    }
}

/// `--dtype`: the dtype of a diffusers folder's frozen weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DtypeArg {
    F32,
    F16,
    Bf16,
}

impl From<DtypeArg> for crate::family::WeightDtype {
    fn from(d: DtypeArg) -> Self {
        match d {
            DtypeArg::F32 => Self::F32,
            DtypeArg::F16 => Self::F16,
            DtypeArg::Bf16 => Self::Bf16,
        }
    }
}

/// Where the `print` of scripts goes on the command line.
fn stderr_log() -> crate::script::Log {
    Arc::new(|line: &str| eprintln!("{line}"))
}

/// A library error about a setting, rewritten to name the flags that set it (`optimizer.lr must
/// be ...` becomes `--lr must be ...`, and fields named in the problem become flags too); other
/// errors pass unchanged.
fn flag_error(e: impl Into<anyhow::Error>) -> anyhow::Error {
    let e = e.into();
    let Some(bad) = e.chain().find_map(|c| c.downcast_ref::<crate::error::ConfigError>()) else { return e };
    anyhow::anyhow!("{} {}", flag_for(bad.field), fields_to_flags(&bad.problem))
}

/// The flag that sets a config field.
fn flag_for(field: &str) -> String {
    match field {
        "optimizer.lr" | "lr" => "--lr".into(),
        "normalisation.min_count" => "--stat-min-count".into(),
        "normalisation.buffer_size" => "--stat-buffer".into(),
        "eval.every" => "--eval-every".into(),
        "eval.prompts" => "--eval-prompts".into(),
        "eval.per_prompt" => "--eval-per-prompt".into(),
        "eval.patience" => "--hack-patience".into(),
        "vlm_url" => "--vlm".into(),
        "sampler.flow_step" => "--sde-type".into(),
        field => format!("--{}", field.trim_start_matches("sampler.").replace('_', "-")),
    }
}

/// `text` with every snake_case or dotted field name in it replaced by its flag.
fn fields_to_flags(text: &str) -> String {
    let mut out = String::new();
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        let is_field = word.contains('_') || ["normalisation.", "optimizer.", "sampler."].iter().any(|p| word.starts_with(p));
        out.push_str(&if is_field { flag_for(word) } else { word.clone() });
        word.clear();
    };
    for c in text.chars() {
        if c.is_ascii_lowercase() || c == '_' || (c == '.' && !word.is_empty()) {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}
