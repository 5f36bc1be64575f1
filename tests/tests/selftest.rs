//! `cargo moe-gate selftest` end to end, on three entries of the cpu catalogue (one gate run each, plus
//! the clean baseline: about half a minute on two cores; `cargo xtask ci` runs the whole catalogue):
//! a harmful routing defect caught and located, a decode-path defect caught by the greedy criterion, a
//! benign change passing, and the table and its files as the docs describe them.

use std::path::Path;
use std::process::Command;

/// The binary under test: `cargo_moe_gate::run`, exactly as `cargo moe-gate` runs it.
const GATE: &str = env!("CARGO_BIN_EXE_gate-under-test");

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is inside the workspace")
}

fn selftest(args: &[&str]) -> (i32, String, String) {
    let out =
        Command::new(GATE).arg("selftest").args(args).current_dir(workspace()).output().expect("starts");
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    (out.status.code().unwrap_or(-1), text(out.stdout), text(out.stderr))
}

fn row<'a>(json: &'a serde_json::Value, defect: &str) -> &'a serde_json::Value {
    json["rows"].as_array().expect("rows").iter().find(|r| r["defect"] == defect).expect("a row per defect")
}

#[test]
fn the_cpu_catalogue_is_caught_located_and_tabulated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().to_str().expect("utf-8 path");
    let (code, stdout, stderr) = selftest(&[
        "--defect",
        "topk-ninth-expert",
        "--defect",
        "kv-stale-row",
        "--defect",
        "moe-sum-by-expert-index",
        "--out-dir",
        out,
    ]);
    let all = format!("exit {code}\n{stdout}\n{stderr}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("selftest.json")).expect("json"))
            .expect("parses");
    assert_eq!(json["baseline"]["exit_code"], 0, "{all}");
    assert!(dir.path().join("selftest.md").is_file());
    assert!(
        stdout.contains("| defect | expected | caught by | layer (step) | diagnosis | op | matched |"),
        "{all}"
    );

    // Layer 1's top-k: caught by the router-set criterion, blamed on cpu at layer 1.
    let ninth = row(&json, "topk-ninth-expert");
    let caught: Vec<&str> =
        ninth["caught_by"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    assert!(caught.iter().any(|c| c.starts_with("AC-CPU-REF-004")), "{all}");
    assert_eq!(ninth["layer"], 1, "{all}");
    assert_eq!(ninth["diagnosis"]["kind"], "defect", "{all}");
    assert_eq!(ninth["diagnosis"]["run"], "cpu", "{all}");

    // The stale KV row shows only in decoding: the greedy criterion fails.
    let stale = row(&json, "kv-stale-row");
    let caught: Vec<&str> =
        stale["caught_by"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    assert_eq!(caught, ["AC-CPU-REF-007 (logits greedy)"], "{all}");

    // The benign change passes and matches.
    let benign = row(&json, "moe-sum-by-expert-index");
    assert_eq!((benign["exit_code"].as_u64(), benign["matched"].as_bool()), (Some(0), Some(true)), "{all}");

    // An op the diagnosis did not name is pending, never matched; the exit code follows the rows.
    for r in json["rows"].as_array().unwrap() {
        let op_check = r["checks"].as_array().unwrap().iter().find(|c| c["what"] == "op");
        if let Some(check) = op_check.filter(|_| r["op"].is_null()) {
            assert!(check["matched"].is_null() && r["matched"] == false, "{all}");
        }
    }
    let every_row_matches = json["rows"].as_array().unwrap().iter().all(|r| r["matched"] == true);
    assert_eq!(code, if every_row_matches { 0 } else { 101 }, "{all}");
    assert_eq!(json["reasons"].as_array().unwrap().is_empty(), every_row_matches, "{all}");
}

#[test]
fn refuses_what_it_cannot_run() {
    let (code, _, stderr) = selftest(&["--backend", "reference"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("the reference is the truth"), "{stderr}");
    let (code, _, stderr) = selftest(&["--defect", "no-such-defect"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("q8-32-expert-input"), "the catalogue is listed: {stderr}");
    let (code, _, stderr) = selftest(&["--defect", "cuda-fmad-off"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("not a cpu defect"), "{stderr}");
}
