//! The `fieldcase` command line, built inside the test crate so integration
//! tests can run the real CLI code as a real process.

fn main() -> std::process::ExitCode {
    fieldcase_cli::main()
}
