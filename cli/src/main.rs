//! The `fieldcase` binary; all logic lives in the library so the test
//! crate can build the very same program.

fn main() -> std::process::ExitCode {
    fieldcase_cli::main()
}
