//! The command line: clap subcommands, progress bars and user-facing errors.

/// Parses the command line and runs the chosen subcommand.
pub fn run() -> anyhow::Result<()> {
    Ok(())
}
