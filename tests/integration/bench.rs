//! `ddpo bench`: the quick conv workload prints a JSON report with positive timings.

use std::process::Command;

#[test]
fn bench_quick_conv_prints_positive_json() {
    let out = Command::new(env!("CARGO_BIN_EXE_ddpo"))
        .args(["bench", "--quick", "--only", "conv"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ddpo bench failed: {stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
    assert!(report["peak_rss_mb"].as_f64().unwrap() > 0.0);
    let workloads = report["workloads"].as_object().unwrap();
    assert_eq!(workloads.len(), 2, "--only conv runs conv_fwd and conv_fwd_bwd: {workloads:?}");
    for key in ["conv_fwd", "conv_fwd_bwd"] {
        let w = &workloads[key];
        for field in ["median_ms", "min_ms", "max_ms", "gflops", "peak_rss_mb"] {
            let v = w[field].as_f64().unwrap_or_else(|| panic!("{key}.{field} missing in {w}"));
            assert!(v > 0.0 && v.is_finite(), "{key}.{field} = {v}");
        }
        assert!(w["min_ms"].as_f64() <= w["median_ms"].as_f64() && w["median_ms"].as_f64() <= w["max_ms"].as_f64());
        assert_eq!(w["repeats"], 1);
    }
}

#[test]
fn bench_rejects_bad_flags() {
    let run = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_ddpo")).args(args).output().unwrap();
    for (args, needle) in [(&["bench", "--only", "nope"][..], "unknown workload"), (&["bench", "--repeats", "0"][..], "--repeats")] {
        let out = run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(needle) && !stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn bench_quick_vlm_times_the_client_and_both_rewards() {
    let out = Command::new(env!("CARGO_BIN_EXE_ddpo")).args(["bench", "--quick", "--only", "vlm"]).output().unwrap();
    assert!(out.status.success(), "ddpo bench failed: {}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
    for key in ["vlm_requests", "reward_clip_alignment", "reward_vlm_alignment"] {
        let per_s = report["workloads"][key]["items_per_s"].as_f64().unwrap_or_else(|| panic!("{key} in {report}"));
        assert!(per_s > 0.0 && per_s.is_finite(), "{key}: {per_s}");
    }
}
