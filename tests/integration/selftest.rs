//! `ddpo selftest` through the binary: it passes on the CPU in f32 and f16, a corrupted golden
//! tensor fails it naming that check, and the GPU check script's dry run passes.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn selftest(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ddpo")).arg("selftest").args(args).output().expect("run ddpo");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!text.contains("panicked"), "ddpo selftest {args:?} panicked: {text}");
    (out.status.success(), text)
}

#[test]
fn selftest_passes_on_cpu_in_f32_and_f16() {
    for dtype in ["f32", "f16"] {
        let (ok, out) = selftest(&["--dtype", dtype]);
        assert!(ok, "selftest --dtype {dtype} failed:\n{out}");
        for name in ["tiny-sd.unet", "tiny-sd.text_encoder", "tiny-sd.vae", "tiny-sd.ddim_step", "tiny-sd.trajectory_log_probs", "shapes.guided_eps", "shapes.trajectory_log_probs"] {
            assert!(out.lines().any(|l| l.starts_with("pass") && l.contains(name)), "no passing {name} line:\n{out}");
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let dest = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &dest);
        } else {
            std::fs::copy(&path, &dest).unwrap();
        }
    }
}

/// A copy of the fixtures with one golden tensor shifted by 0.01.
fn corrupted_fixtures(dir: &Path, key: &str) -> PathBuf {
    let fixtures = dir.join("fixtures");
    for sub in ["tiny-sd", "shapes-golden"] {
        copy_dir(&Path::new(FIXTURES).join(sub), &fixtures.join(sub));
    }
    let golden = fixtures.join("tiny-sd/golden.safetensors");
    let mut tensors = candle_core::safetensors::load(&golden, &Device::Cpu).unwrap();
    let bad: Tensor = (&tensors[key] + 0.01).unwrap();
    tensors.insert(key.to_string(), bad);
    candle_core::safetensors::save(&tensors, &golden).unwrap();
    fixtures
}

#[test]
fn a_corrupted_golden_tensor_fails_naming_its_check() {
    let tmp = tempfile::tempdir().unwrap();
    let fixtures = corrupted_fixtures(tmp.path(), "unet.eps_cond");
    let (ok, out) = selftest(&["--fixtures", fixtures.to_str().unwrap()]);
    assert!(!ok, "a corrupted fixture passed:\n{out}");
    assert!(out.lines().any(|l| l.starts_with("FAIL") && l.contains("tiny-sd.unet")), "{out}");
    assert!(out.contains("1 of 8 checks failed: tiny-sd.unet"), "{out}");
    assert!(out.lines().any(|l| l.starts_with("pass") && l.contains("tiny-sd.vae")), "the other checks still run:\n{out}");
}

#[test]
fn a_missing_fixtures_folder_fails_every_check_saying_what_to_pass() {
    let (ok, out) = selftest(&["--fixtures", "/no/such/fixtures"]);
    assert!(!ok, "{out}");
    assert!(out.contains("--fixtures DIR"), "{out}");
}

#[test]
fn gpu_check_script_dry_runs_on_cpu() {
    let out = Command::new("bash")
        .args([concat!(env!("CARGO_MANIFEST_DIR"), "/benches/gpu/check.sh"), "--dry-run"])
        .env("DDPO_BIN", env!("CARGO_BIN_EXE_ddpo"))
        .output()
        .expect("run bash");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "check.sh --dry-run failed:\n{text}");
    for stage in ["selftest-f32", "selftest-f16", "tiny-sd-epoch", "sd-random-weights", "sd15-epoch", "sd15-torch-twin"] {
        assert!(text.contains(&format!("stage {stage}")), "no timing for {stage}:\n{text}");
    }
}
