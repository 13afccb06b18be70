//! Memory figures of this process, from /proc/self/status (Linux only).

/// The process's peak resident set size (VmHWM in /proc/self/status), in MiB.
pub fn peak_rss_mb() -> anyhow::Result<f64> {
    memory_mb("VmHWM")
}

/// A memory figure of /proc/self/status (`VmHWM`, `VmRSS`), in MiB.
pub fn memory_mb(key: &str) -> anyhow::Result<f64> {
    use anyhow::Context;
    let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status for the memory figures")?;
    parse_status_kb(&status, key)
        .map(|kb| kb as f64 / 1024.0)
        .with_context(|| format!("no {key} line in /proc/self/status (memory is only measured on Linux)"))
}

/// The value (kB) of the `key:` line of a /proc/<pid>/status text.
fn parse_status_kb(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.strip_prefix(key).is_some_and(|rest| rest.starts_with(':')))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_memory_lines() {
        let status = "Name:\tddpo\nVmPeak:\t  9000 kB\nVmHWM:\t  123456 kB\nVmRSS:\t 1000 kB\n";
        assert_eq!(parse_status_kb(status, "VmHWM"), Some(123456));
        assert_eq!(parse_status_kb(status, "VmRSS"), Some(1000));
        assert_eq!(parse_status_kb("Name: x\n", "VmHWM"), None);
    }
}
