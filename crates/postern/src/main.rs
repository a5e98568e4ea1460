//! The `postern` binary: everything lives in the library; see `cli`.
fn main() -> std::process::ExitCode {
    postern::cli::main()
}
