//! The stock `streamex` binary: the command line with the operators that ship with streamex.

// Every event is a few dozen small allocations (a JSON map per record, a key and a value per
// column); with mimalloc instead of glibc's allocator a drain takes 12-15% fewer instructions
// (callgrind, BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    streamex::cli::main(streamex::operators::registry())
}
