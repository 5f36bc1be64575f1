//! The reports of a run that did not finish: interrupted (SIGINT, SIGTERM) or stopped by an error (a
//! device out of memory, an NVRTC or driver failure). While the gate runs, [`watch`] keeps what the
//! reports would say so far: the contract and model from the start, the judged trials once evaluation
//! has run ([`verdict`]). If the run ends early, [`abandon`] writes report.json, report.md, layers.svg and
//! junit.xml from it, marked incomplete ([`super::Verdict::incomplete`], an `<error>` in junit.xml), so CI
//! shows what happened and `merge` refuses the file instead of reading it as a whole shard.

use std::path::PathBuf;
use std::sync::{Mutex, Once};

use moe_contracts::{Contract, CriterionSummary};

use super::{ContractInfo, CudaInfo, GateReport, ModelInfo, SCHEMA_VERSION, Timings, Verdict};
use crate::cli::GateArgs;
use crate::model::ModelChoice;
use crate::verdict::Judged;

/// Exit code of a run interrupted by SIGINT (the shell's 128 + 2).
pub const EXIT_SIGINT: u8 = 130;
/// Exit code of a run terminated by SIGTERM (128 + 15).
pub const EXIT_SIGTERM: u8 = 143;

/// What the reports of the running gate would say now, and where they go.
struct Watch {
    report_dir: Option<PathBuf>,
    junit: Option<PathBuf>,
    report: GateReport,
    /// What the run is doing, for the message ("recording the forwards", ...).
    phase: &'static str,
}

static WATCH: Mutex<Option<Watch>> = Mutex::new(None);
static SIGNALS: Once = Once::new();

fn lock() -> std::sync::MutexGuard<'static, Option<Watch>> {
    WATCH.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Starts watching a gate run of `contract` on the chosen model: from now on an interruption or an error
/// leaves incomplete reports where `args` asks for reports. Installs the SIGINT/SIGTERM handler.
pub fn watch(args: &GateArgs, contract: &Contract, choice: &ModelChoice, n_layer: usize) {
    let report = GateReport {
        schema_version: SCHEMA_VERSION,
        tool: format!("cargo-moe-gate {}", env!("CARGO_PKG_VERSION")),
        contract: ContractInfo {
            id: contract.contract.clone(),
            version: contract.version.to_string(),
            title: contract.title.clone(),
            status: contract.status.to_string(),
            path: contract.path.display().to_string(),
        },
        model: ModelInfo {
            spec: choice.spec.clone(),
            source: choice.source.to_string(),
            reason: choice.reason.clone(),
            n_layer,
        },
        partition: None,
        shards: Vec::new(),
        cuda: CudaInfo { needed: false, available: false, reason: None },
        timings: Timings::default(),
        criteria: Vec::new(),
        trials: Vec::new(),
        layers: Vec::new(),
        argmax: Vec::new(),
        diagnoses: Vec::new(),
        greedy: Vec::new(),
        ties: Vec::new(),
        verdict: Verdict {
            exit_code: crate::EXIT_UNJUDGED,
            blocking_failed: Vec::new(),
            advisory_failed: Vec::new(),
            ignored: 0,
            line: String::new(),
            lenient: Vec::new(),
            incomplete: None,
        },
    };
    let phase = "recording the forwards";
    *lock() = Some(Watch { report_dir: args.report_dir.clone(), junit: args.junit.clone(), report, phase });
    SIGNALS.call_once(install_signal_handler);
}

/// Every trial is judged: an interruption from now on leaves their outcomes in the reports.
pub fn judged(judged: &Judged<'_>, summaries: &[CriterionSummary]) {
    if let Some(w) = lock().as_mut() {
        w.report.criteria = judged.criteria(summaries);
        w.report.trials = judged.trials();
        w.report.layers = judged.layer_tables();
        w.phase = "diagnosing the failures";
    }
}

/// The run finished: the real reports follow, and an interruption no longer writes incomplete ones.
pub fn finished() {
    *lock() = None;
}

/// Ends the watched run early, with `reason` and exit code `exit_code`: writes the incomplete reports
/// (if the run asked for reports) and says where. Returns whether a run was being watched.
pub fn abandon(reason: &str, exit_code: u8) -> bool {
    let Some(mut w) = lock().take() else { return false };
    let judged = w.report.trials.len();
    let why = format!("{reason} (while {}); the run did not finish", w.phase);
    w.report.verdict.line = match judged {
        0 => format!("INCOMPLETE: {why}; no trial was judged"),
        n => format!("INCOMPLETE: {why}; {n} trials were judged before it stopped, no verdict"),
    };
    w.report.verdict.exit_code = exit_code;
    w.report.verdict.incomplete = Some(why);
    if let Some(dir) = &w.report_dir {
        match w.report.write_dir(dir) {
            Ok(()) => eprintln!("moe-gate: incomplete reports written to {}", dir.display()),
            Err(e) => eprintln!("moe-gate: could not write the incomplete reports: {e}"),
        }
    }
    if let Some(file) = &w.junit
        && let Err(e) = w.report.write_junit(file)
    {
        eprintln!("moe-gate: could not write the incomplete JUnit report: {e}");
    }
    true
}

/// SIGINT and SIGTERM end the run through [`abandon`], then exit 130 or 143. (A second signal while the
/// reports are written waits for them.)
fn install_signal_handler() {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!(
                "moe-gate: cannot install the SIGINT/SIGTERM handler ({e}); an interrupted run leaves no report"
            );
            return;
        }
    };
    std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            let (name, code) =
                if signal == SIGTERM { ("SIGTERM", EXIT_SIGTERM) } else { ("SIGINT", EXIT_SIGINT) };
            eprintln!("\nmoe-gate: interrupted by {name}");
            abandon(&format!("interrupted by {name}"), code);
            std::process::exit(code.into());
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_abandoned_run_writes_reports_marked_incomplete_that_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let sample = crate::report::sample::report();
        *lock() = Some(Watch {
            report_dir: Some(dir.path().to_path_buf()),
            junit: None,
            report: sample.clone(),
            phase: "diagnosing the failures",
        });
        assert!(abandon("out of device memory", crate::EXIT_UNJUDGED));
        assert!(!abandon("again", 2), "the watch ends with the first abandon");
        let text = std::fs::read_to_string(dir.path().join("report.json")).unwrap();
        let back = GateReport::from_json(&text).unwrap();
        let why = back.verdict.incomplete.expect("marked incomplete");
        assert_eq!(why, "out of device memory (while diagnosing the failures); the run did not finish");
        assert_eq!(back.verdict.exit_code, 2);
        assert_eq!(back.trials.len(), sample.trials.len(), "what was judged is kept");
        let junit = std::fs::read_to_string(dir.path().join("junit.xml")).unwrap();
        assert!(junit.contains("<error message=\"out of device memory"), "{junit}");
    }
}
