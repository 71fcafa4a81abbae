//! `cubicle tpl ...`: template build and listing.

use std::process::ExitCode;

use cubicle_core::DataDir;

use crate::args::TplCommand;

pub fn run(_data: &DataDir, _cmd: TplCommand) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
