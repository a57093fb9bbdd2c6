//! The `relay` binary: see `relay --help`.

fn main() -> std::process::ExitCode {
    relay::cli::main()
}
