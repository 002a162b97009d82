//! The `leadflow` command built inside the test crate, so tests can run services as separate processes.

use std::process::ExitCode;

fn main() -> ExitCode {
    leadflow::cli::main()
}
