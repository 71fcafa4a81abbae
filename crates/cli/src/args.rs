//! Command-line arguments (clap structs only; behaviour lives in `commands/`).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Cubicle: self-hosted sandboxes for AI agents.
#[derive(Debug, Parser)]
#[command(name = "cubicle", version, about)]
pub struct Cli {
    /// Data directory (templates, sandboxes, state).
    #[arg(long, global = true, env = "CUBICLE_DATA_DIR", default_value = cubicle_core::DataDir::DEFAULT)]
    pub data_dir: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build, list and remove templates.
    #[command(subcommand)]
    Tpl(TplCommand),
}

#[derive(Debug, Subcommand)]
pub enum TplCommand {
    /// Build a built-in template (only `base` for now). Does nothing when the template
    /// is already built from the current recipe, unless --rebuild is given.
    Build(TplBuildArgs),
    /// List built templates.
    #[command(alias = "list")]
    Ls(JsonFlag),
    /// Delete a built template (sandboxes must not be using it).
    #[command(alias = "remove")]
    Rm(TplRmArgs),
}

#[derive(Debug, Args)]
pub struct TplBuildArgs {
    /// Which built-in template.
    #[arg(default_value = "base")]
    pub name: String,
    /// Build again even if the recipe did not change.
    #[arg(long)]
    pub rebuild: bool,
    /// Debian mirror URL (default: the host's apt sources).
    #[arg(long, env = "CUBICLE_DEBIAN_MIRROR")]
    pub mirror: Option<String>,
    /// Print every line of build output instead of a summary.
    #[arg(long, short)]
    pub verbose: bool,
}

#[derive(Debug, Args)]
pub struct TplRmArgs {
    /// The template to delete.
    pub name: String,
}

#[derive(Debug, Args)]
pub struct JsonFlag {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}
