//! One module per subcommand.

mod tpl;

use std::process::ExitCode;

use crate::args::{Cli, Command};

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let data = cubicle_core::DataDir::new(&cli.data_dir);
    match cli.command {
        Command::Tpl(cmd) => tpl::run(&data, cmd),
    }
}
