//! The `relay` binary: see `relay --help`.

// jemalloc, set to give back what bursts of traffic leave behind: see relay::allocator.
#[global_allocator]
static GLOBAL: relay::allocator::Jemalloc = relay::allocator::Jemalloc;

fn main() -> std::process::ExitCode {
    // Before any thread starts (relay::allocator::configure says why).
    if let Err(err) = relay::allocator::configure() {
        eprintln!("relay: the allocator's settings could not be applied: {err}");
    }
    relay::cli::main()
}
