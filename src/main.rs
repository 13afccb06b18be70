fn main() {
    // candle's element-wise thread pool spins while it waits; on a small machine that also runs
    // reward workers, those spinning threads steal the cores that gemm needs. One element-wise
    // thread measured the same on an idle 2-core machine and ~25% faster on a loaded one.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    if let Err(err) = ddpo::cli::run() {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
