//! The `keygate` binary: parse arguments, run, map the outcome to an exit code.

// Only in the allocator A/B build (issue 13); the default build uses the system allocator.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    keygate::cli::main()
}
