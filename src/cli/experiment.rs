//! `ddpo experiment FILE.rhai`: the runs an experiment script declares, resumed where they
//! stopped, then the table and the curves; `--report` writes those from the runs finished so far.
//! A run's options are `ddpo train`'s flags, parsed by the same clap definitions.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{CommandFactory, Parser};

use super::train;
use crate::experiment::{report, Experiment, Outcome};
use crate::run::RunConfig;
use crate::script::Limits;
use crate::session::ScriptPaths;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The experiment script (see scripts/experiments/).
    file: PathBuf,
    /// Only write results.md and results.png from the runs finished so far.
    #[arg(long)]
    report: bool,
    /// Only check the script and every run's settings, and list the runs with their state.
    #[arg(long, conflicts_with = "report")]
    plan: bool,
    /// The folder the experiment's own folder (named in the script) goes in.
    #[arg(long, default_value = "experiments")]
    root: PathBuf,
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// `ddpo train`'s flags alone, to parse a run's options with.
#[derive(Debug, Parser)]
#[command(name = "ddpo train", allow_negative_numbers = true)]
struct TrainFlags {
    #[command(flatten)]
    args: train::Args,
}

/// The command line of a run's options: `--option value`, or `--option` alone for a switch
/// set to true.
fn argv(options: &[(String, String)]) -> Result<Vec<String>, String> {
    let command = TrainFlags::command();
    let mut out = vec!["train".to_string()];
    for (option, value) in options {
        let Some(arg) = command.get_arguments().find(|a| a.get_long() == Some(option.as_str())) else {
            // clap's own message names the nearest option.
            return Err(parse(&["train".into(), format!("--{option}")]).err().unwrap_or_else(|| format!("ddpo train has no option --{option}")));
        };
        match (arg.get_action().takes_values(), value.as_str()) {
            (true, _) => out.extend([format!("--{option}"), value.clone()]),
            (false, "true") => out.push(format!("--{option}")),
            (false, "false") => {}
            (false, other) => return Err(format!("--{option} is a switch: set it to true or false, not {other}")),
        }
    }
    Ok(out)
}

/// Parses `ddpo train` flags; an error is clap's message without its usage lines.
fn parse(argv: &[String]) -> Result<TrainFlags, String> {
    TrainFlags::try_parse_from(argv).map_err(|e| {
        let text = e.to_string();
        let kept: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more information")).collect();
        kept.join("; ").trim_start_matches("error: ").to_string()
    })
}

/// Checks one option as it is declared in the script.
fn validate(option: &str, value: &str) -> Result<(), String> {
    parse(&argv(&[(option.to_string(), value.to_string())])?).map(|_| ())
}

/// A run's settings from its options, exactly as `ddpo train` with those flags would make them
/// (no implicit scripts/ defaults: an experiment names its scripts).
fn configure(options: &[(String, String)]) -> anyhow::Result<(RunConfig, ScriptPaths)> {
    let flags = parse(&argv(options).map_err(anyhow::Error::msg)?).map_err(anyhow::Error::msg)?;
    Ok((flags.args.run_config().map_err(super::flag_error)?, flags.args.script_paths()?))
}

pub fn exec(args: Args) -> anyhow::Result<()> {
    let device = super::device(&args.device)?;
    let log = super::stderr_log();
    let spec = crate::script::experiment::load(&args.file, &Limits::default(), log.clone(), Arc::new(validate))?;
    let exp = Experiment::new(spec, &args.root);
    if args.plan {
        exp.check(&configure)?;
        for run in exp.spec.runs() {
            println!("{:<12} {}", format!("{:?}", exp.state(&run)).to_lowercase(), exp.run_dir(&run).display());
        }
        return Ok(());
    }
    if !args.report {
        let bar = train::stage_bar();
        let mut lines = train::EpochLines { bar: &bar };
        let stop = super::interrupt_flag();
        if let Outcome::Interrupted { run } = exp.run(&configure, log, &device, &mut lines, &stop)? {
            eprintln!("stopped in run {run}; run `ddpo experiment {}` again to continue it", args.file.display());
        }
    }
    let report = report::report(&exp)?;
    let (md, png) = report.write(&exp)?;
    print!("{}", report.markdown);
    eprintln!("wrote {} and {}", md.display(), png.display());
    Ok(())
}
