//! `ddpo check FILE...`: compiles each script and dry-runs it (rewards on a few shapes-world
//! images, prompt scripts by drawing a few prompts, hooks once each with a first epoch's
//! context); prints `ok` or `file:line:col: message`. A file defining no entry point but a near
//! miss of one (`fn rewrd(img, prompt, meta)`, `fn reward(img)`) fails, unless another file of
//! the same check imports it (a module on purpose).

use std::path::PathBuf;

use super::stderr_log;
use crate::reward::models::LazyModels;
use crate::script::{check_files_with, Limits};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Rhai scripts to check (reward, prompt or hooks scripts, or modules).
    #[arg(required = true)]
    files: Vec<PathBuf>,
    #[command(flatten)]
    vlm: super::vlm::VlmArgs,
}

pub fn exec(args: Args) -> anyhow::Result<()> {
    let mut failed = 0;
    let models = LazyModels::default().with_vlm(args.vlm.config()?);
    let results = check_files_with(&args.files, &Limits::default(), stderr_log(), models);
    for (file, result) in args.files.iter().zip(results) {
        match result {
            Ok(summary) => println!("{}: ok ({summary})", file.display()),
            Err(e) => {
                failed += 1;
                println!("{e:#}");
            }
        }
    }
    anyhow::ensure!(failed == 0, "{failed} of {} scripts failed the check", args.files.len());
    Ok(())
}
