// glibc's allocator spent a sixth of a loaded node's CPU consolidating and unlinking chunks
// (BENCHMARKS.md); jemalloc's per-thread caches do not.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    raftchat::cli::main()
}
