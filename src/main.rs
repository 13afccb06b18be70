fn main() {
    if let Err(err) = ddpo::cli::run() {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
