//! `cdpcli`: target inspection, with the fields admins of the seed product know.

fn main() -> std::process::ExitCode {
    std::process::ExitCode::SUCCESS
}
