fn main() {
    // candle's element-wise thread pool spins while it waits, stealing the cores that gemm and
    // the reward workers need.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    // Without it candle parses /proc/cpuinfo on every matmul to size gemm's thread pool.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", cores.to_string());
    }
    // A user-facing error is its cause chain; backtraces of library errors only with --debug
    // (panics keep RUST_BACKTRACE's).
    if !std::env::args().any(|a| a == "--debug") {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    // Before any thread exists, so that every thread shares glibc's one arena (see kernels::alloc).
    ddpo::kernels::alloc::reuse_freed_memory();
    if let Err(err) = ddpo::cli::run() {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
