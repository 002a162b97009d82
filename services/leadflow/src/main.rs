//! The `leadflow` binary.

fn main() -> std::process::ExitCode {
    leadflow::cli::main()
}
