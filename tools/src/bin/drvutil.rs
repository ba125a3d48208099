//! `drvutil`: inspection of rewind's filter (see `tools::drvutil`).

use clap::Parser;
use tools::drvutil::{run, DrvutilArgs};

fn main() -> std::process::ExitCode {
    tools::logging::init();
    let args = DrvutilArgs::parse();
    match run(&args) {
        Ok(out) => {
            print!("{out}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("drvutil: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
