//! `cdpcli`: target inspection, with the fields admins of the seed product know.

use clap::Parser;

fn main() -> std::process::ExitCode {
    tools::logging::init();
    let args = tools::cdpcli::CdpcliArgs::parse();
    match tools::cdpcli::run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cdpcli: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
