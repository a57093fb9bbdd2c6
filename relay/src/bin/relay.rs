//! The `relay` binary: see `relay --help`.

// Every exchange allocates and frees many small buffers (HTTP heads, JSON messages,
// WebSocket frames) across threads; glibc's allocator spent ~15 % of the relay's CPU on
// that under load (BENCHMARKS.md), mimalloc much less.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    relay::cli::main()
}
