//! `imshard-loadgen`: see the library docs (`cargo doc -p imshard-loadgen`) and
//! loadgen/README.md.

use std::process::ExitCode;

use clap::Parser;
use imshard_loadgen::{app, cli::Cli};

/// Exit status when the run went through but something failed or was not delivered.
const EXIT_FAILED: u8 = 1;
/// Exit status when the run could not start.
const EXIT_CANNOT_RUN: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match app::run(cli.scenario) {
        Ok(report) => {
            print!("{}", report.human());
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_FAILED)
            }
        }
        Err(e) => {
            eprintln!("imshard-loadgen: {e}");
            ExitCode::from(EXIT_CANNOT_RUN)
        }
    }
}
