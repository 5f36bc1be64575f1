//! The command line of docs/architecture.md: the gate itself (our flags and libtest's in one line) and the
//! subcommands `trace`, `synth`, `validate`, `list`, `quantize`, `merge` (docs/gate.md's sharding) and
//! `bench` (docs/gate.md's speed measurement).

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::lengths::Lengths;
use crate::partition::Partition;

/// `cargo moe-gate`: numerical parity between the CPU and CUDA forwards, judged by a versioned contract.
#[derive(Debug, Parser)]
#[command(
    name = "cargo-moe-gate",
    bin_name = "cargo moe-gate",
    version,
    args_conflicts_with_subcommands = true,
    after_help = "Exit codes: 0 every blocking gate holds; 101 a blocking gate failed; \
                  2 the run could not be judged (bad arguments, unreadable or invalid contract or model, \
                  CUDA required but absent)."
)]
pub struct Cli {
    /// A subcommand; without one, the gate runs.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The gate's flags (used when no subcommand is given).
    #[command(flatten)]
    pub gate: GateArgs,
}

/// Flags of the gate run: ours, then libtest's (a name filter, `--exact`, `--skip`, `--list`, ...).
#[derive(Debug, Args)]
pub struct GateArgs {
    /// The contract: an id (the stem of a file in the workspace's contracts dir) or a path to a YAML file.
    /// Defaults to the workspace's `default-contract` ([workspace.metadata.moe-gate]).
    #[arg(long, value_name = "NAME|PATH")]
    pub contract: Option<String>,
    /// The model to run: a `.gguf` path or `synth:PRESET[:QUANT][@SEED]`. Overrides the contract's `model`
    /// (used where CUDA is usable) and `smoke_model` (used elsewhere).
    #[arg(long, value_name = "SPEC")]
    pub model: Option<String>,
    /// Treat an absent or unusable CUDA device as an error (exit 2) instead of listing CUDA trials as ignored.
    #[arg(long)]
    pub require_cuda: bool,
    /// Write report.json, report.md, layers.svg and junit.xml into this directory (created if missing).
    #[arg(long, value_name = "DIR")]
    pub report_dir: Option<PathBuf>,
    /// Write a JUnit XML report to this file.
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    /// Exit 0 even when no trial of a blocking criterion is judged (a filter that selects nothing, every
    /// trial ignored). Without it such a run exits 2: it checked nothing.
    #[arg(long)]
    pub allow_empty: bool,
    /// Judge only shard K of N: the trials of every N-th prompt of the contract (as resolved for the
    /// model), starting with the K-th. Join the shards' report.json files with `cargo moe-gate merge`.
    #[arg(long, value_name = "K/N")]
    pub partition: Option<Partition>,
    /// libtest's arguments.
    #[command(flatten)]
    pub libtest: libtest_mimic::Arguments,
}

/// Subcommands next to the gate run.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Runs one forward and writes its trace (docs/architecture.md) as safetensors.
    Trace(TraceArgs),
    /// Writes a synthetic model (`synth:PRESET[:QUANT][@SEED]`) as a GGUF v3 file.
    Synth(SynthArgs),
    /// Parses and validates contracts (all in the workspace's contracts dir when none is named).
    Validate(ValidateArgs),
    /// Lists the contracts found in the workspace and their criteria.
    List,
    /// Re-quantises a GGUF model to another tensor mix, keeping its metadata.
    Quantize(QuantizeArgs),
    /// Joins the report.json files of the shards of one `--partition K/N` run into the whole contract's
    /// report and verdict (exit 0 or 101, like the gate).
    Merge(MergeArgs),
    /// Measures prefill and decode tokens/s of one backend on one model, and decode against the
    /// bandwidth roofline.
    Bench(BenchArgs),
    /// Tokenises text with a model's own tokenizer (the one its GGUF carries), as text prompts are.
    Tokenize(TokenizeArgs),
    /// The gate judged on itself: runs a contract once clean and once per seeded defect of a backend
    /// (the catalogue in moe_engine::defect), and checks that every harmful defect is caught with the
    /// right backend, layer and op named and every benign change passes. Prints one table (also
    /// selftest.md and selftest.json in --out-dir). Exit 0 when every row matches the catalogue, 101
    /// when one does not (the reasons are listed), 2 when it could not run.
    #[command(
        after_help = "Examples:\n  cargo moe-gate selftest                       # cpu defects, cpu-vs-reference-v1 on synth:tiny, no GPU\n  cargo moe-gate selftest --backend cuda        # cuda defects, qwen3-moe-forward-gpu-v1 on synth:small (needs a GPU)\n  cargo moe-gate selftest --defect rope-wrong-base --defect kv-stale-row"
    )]
    Selftest(SelftestArgs),
}

/// Arguments of `cargo moe-gate selftest`.
#[derive(Debug, Args)]
pub struct SelftestArgs {
    /// Whose defects to seed: cpu (judged by cpu-vs-reference-v1 on its smoke model, no GPU needed) or
    /// cuda (judged by qwen3-moe-forward-gpu-v1 on synth:small; needs a CUDA device).
    #[arg(long, value_name = "cpu|cuda", default_value = "cpu")]
    pub backend: String,
    /// The contract to judge each defect with (an id or a path); it must have a run on the backend.
    /// Its smoke prompts run (sets marked `only_on: model` are dropped).
    #[arg(long, value_name = "NAME|PATH")]
    pub contract: Option<String>,
    /// The model (`.gguf` path or `synth:...`); default: the contract's smoke model for cpu, synth:small
    /// for cuda.
    #[arg(long, value_name = "SPEC")]
    pub model: Option<String>,
    /// Only this defect (repeatable); default: every defect of the backend.
    #[arg(long = "defect", value_name = "NAME")]
    pub defects: Vec<String>,
    /// Where to write selftest.md and selftest.json (default target/moe-gate-selftest).
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
}

/// Arguments of `cargo moe-gate tokenize`.
#[derive(Debug, Args)]
pub struct TokenizeArgs {
    /// The model: a `.gguf` path or `synth:PRESET[:QUANT][@SEED]`.
    #[arg(long, value_name = "SPEC")]
    pub model: String,
    /// The text to tokenise; prints its ids and their text.
    #[arg(long, value_name = "TEXT", conflicts_with = "jsonl", required_unless_present = "jsonl")]
    pub text: Option<String>,
    /// A file of JSON lines, each `{"text": "..."}` or `{"hex": "..."}` (raw bytes, which must be UTF-8);
    /// writes one line per input to stdout: `{"ids": [...], "text": "..."}` (the ids decoded) or
    /// `{"error": "..."}`.
    #[arg(long, value_name = "FILE.jsonl")]
    pub jsonl: Option<PathBuf>,
}

/// Arguments of `cargo moe-gate trace`.
#[derive(Debug, Args)]
pub struct TraceArgs {
    /// The model: a `.gguf` path or `synth:PRESET[:QUANT][@SEED]`.
    #[arg(long, value_name = "SPEC")]
    pub model: String,
    /// The prompt as comma-separated token ids, e.g. `785,9217,308`.
    #[arg(long, value_name = "IDS", value_delimiter = ',', num_args = 1.., required = true)]
    pub tokens: Vec<u32>,
    /// The backend: reference (f64), cpu or cuda.
    #[arg(long, value_name = "reference|cpu|cuda")]
    pub backend: String,
    /// The numerics policy: fast (each backend's fastest way) or exact (one canonical operation order).
    #[arg(long, value_name = "fast|exact", default_value = "fast")]
    pub policy: String,
    /// Where to write the trace (safetensors).
    #[arg(long, value_name = "FILE.safetensors")]
    pub out: PathBuf,
    /// Record every layer's sub-layer taps too (attn_norm, q, k, v, attn_out, attn_proj, attn_residual,
    /// ffn_norm, expert_out, moe_out: docs/architecture.md).
    #[arg(long)]
    pub taps: bool,
}

/// Arguments of `cargo moe-gate synth`.
#[derive(Debug, Args)]
pub struct SynthArgs {
    /// The synthetic model's spec, `synth:PRESET[:QUANT][@SEED]`.
    #[arg(long, value_name = "SPEC")]
    pub model: String,
    /// Where to write the GGUF file.
    #[arg(long, value_name = "FILE.gguf")]
    pub out: PathBuf,
}

/// Arguments of `cargo moe-gate validate`.
#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Contract ids or paths; all contracts of the workspace when empty.
    #[arg(value_name = "CONTRACT")]
    pub contracts: Vec<String>,
}

/// Arguments of `cargo moe-gate quantize`.
#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// The GGUF file to read.
    #[arg(long = "in", value_name = "FILE.gguf")]
    pub input: PathBuf,
    /// The GGUF file to write.
    #[arg(long, value_name = "FILE.gguf")]
    pub out: PathBuf,
    /// The tensor mix: f32, f16, bf16, q8_0, q4_k, q5_k, q6_k or q4_k_m.
    #[arg(long, value_name = "QUANT")]
    pub quant: String,
}

/// Arguments of `cargo moe-gate merge`.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The shards' report.json files, one per partition 1..N, in any order.
    #[arg(value_name = "REPORT.json", required = true, num_args = 1..)]
    pub reports: Vec<PathBuf>,
    /// Write the merged report.json, report.md, layers.svg and junit.xml into this directory.
    #[arg(long, value_name = "DIR")]
    pub report_dir: Option<PathBuf>,
    /// Write the merged JUnit XML report to this file.
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    /// The contract the shards judged (an id or a path), when the path their reports recorded is not
    /// readable here. It must have the shards' id and version.
    #[arg(long, value_name = "NAME|PATH")]
    pub contract: Option<String>,
    /// Exit 0 even when the shards judged no trial of a blocking criterion. Without it such a merge
    /// exits 2: it checked nothing.
    #[arg(long)]
    pub allow_empty: bool,
}

/// Arguments of `cargo moe-gate bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The model: a `.gguf` path or `synth:PRESET[:QUANT][@SEED]`. The production shape is
    /// `synth:qwen3-coder-30b-a3b:q4_k_m`.
    #[arg(long, value_name = "SPEC", default_value = crate::model::BENCH_DEFAULT_MODEL)]
    pub model: String,
    /// The backend: reference (f64), cpu or cuda.
    #[arg(long, value_name = "reference|cpu|cuda", default_value = "cpu")]
    pub backend: String,
    /// The numerics policy: fast (each backend's fastest way) or exact (one canonical operation order).
    #[arg(long, value_name = "fast|exact", default_value = "fast")]
    pub policy: String,
    /// Prompt lengths to time a prefill of, comma-separated.
    #[arg(long, value_name = "N,N,...", default_value = "1,64,512")]
    pub prefill: Lengths,
    /// Greedy decode steps to time, after an 8-token prefill.
    #[arg(long, value_name = "N", default_value_t = 128)]
    pub decode: usize,
    /// Timed forwards per prefill length (after one warm-up); the median counts.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub repeats: usize,
    /// Also write the numbers as JSON (`schema: 1`) to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// The subcommands, for "did you mean" hints.
pub const SUBCOMMANDS: [&str; 7] = ["trace", "synth", "validate", "list", "quantize", "merge", "bench"];

/// The subcommand `word` is probably a typo of (within two edits, and not itself one), for a gate run
/// whose name filter is `word`: `cargo moe-gate valdate` runs the gate with the filter "valdate".
pub fn subcommand_typo(word: &str) -> Option<&'static str> {
    let word = word.to_ascii_lowercase();
    if SUBCOMMANDS.contains(&word.as_str()) || word.contains("::") {
        return None;
    }
    SUBCOMMANDS
        .into_iter()
        .map(|s| (edit_distance(&word, s), s))
        .filter(|&(d, _)| d <= 2)
        .min()
        .map(|(_, s)| s)
}

/// Levenshtein distance between two short words.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let substituted = diagonal + usize::from(ca != cb);
            diagonal = row[j + 1];
            row[j + 1] = substituted.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

/// Drops the `moe-gate` that cargo inserts as `argv[1]` when it runs an installed `cargo-moe-gate`
/// subcommand, so both invocations parse the same way.
pub fn normalize_args(args: Vec<OsString>) -> Vec<OsString> {
    let mut args = args;
    if args.get(1).is_some_and(|a| a == "moe-gate") {
        args.remove(1);
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Cli {
        let args = normalize_args(args.iter().map(OsString::from).collect());
        Cli::try_parse_from(args).unwrap()
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn installed_subcommand_argv_is_stripped() {
        let direct = parse(&["cargo-moe-gate", "--contract", "c1", "--exact", "x::y"]);
        let installed = parse(&["cargo-moe-gate", "moe-gate", "--contract", "c1", "--exact", "x::y"]);
        assert_eq!(direct.gate.contract.as_deref(), Some("c1"));
        assert_eq!(installed.gate.contract.as_deref(), Some("c1"));
        assert!(installed.gate.libtest.exact);
        assert_eq!(installed.gate.libtest.filter.as_deref(), Some("x::y"));
    }

    #[test]
    fn our_flags_and_libtest_flags_share_one_line() {
        let cli = parse(&[
            "g",
            "--contract",
            "c.yaml",
            "--model",
            "synth:tiny",
            "--require-cuda",
            "--skip",
            "layer01",
            "--skip",
            "layer02",
            "--format",
            "json",
            "--test-threads",
            "1",
            "--include-ignored",
            "AC-1",
        ]);
        assert!(cli.command.is_none());
        assert_eq!(cli.gate.model.as_deref(), Some("synth:tiny"));
        assert!(cli.gate.require_cuda);
        assert_eq!(cli.gate.libtest.skip, vec!["layer01", "layer02"]);
        assert_eq!(cli.gate.libtest.format, Some(libtest_mimic::FormatSetting::Json));
        assert_eq!(cli.gate.libtest.test_threads, Some(1));
        assert!(cli.gate.libtest.include_ignored);
        assert_eq!(cli.gate.libtest.filter.as_deref(), Some("AC-1"));
    }

    #[test]
    fn trace_tokens_are_comma_separated() {
        let cli = parse(&[
            "g",
            "trace",
            "--model",
            "m.gguf",
            "--tokens",
            "785,9217,308",
            "--backend",
            "cpu",
            "--out",
            "t.st",
        ]);
        match cli.command {
            Some(Command::Trace(t)) => {
                assert_eq!(t.tokens, vec![785, 9217, 308]);
                assert_eq!(t.policy, "fast");
            }
            other => panic!("expected trace, got {other:?}"),
        }
    }

    #[test]
    fn partition_is_k_of_n() {
        let cli = parse(&["g", "--partition", "2/3", "--list"]);
        assert_eq!(cli.gate.partition, Some(Partition { index: 2, count: 3 }));
        for bad in ["0/3", "4/3", "a/b", "3"] {
            let e = Cli::try_parse_from(["g", "--partition", bad]).unwrap_err();
            assert!(e.use_stderr(), "{bad}: an error, exit 2");
            let msg = e.to_string();
            assert!(msg.contains("the accepted form is K/N"), "{bad}: {msg}");
        }
    }

    #[test]
    fn merge_takes_reports_and_an_output_dir() {
        let cli = parse(&["g", "merge", "a/report.json", "b/report.json", "--report-dir", "out"]);
        match cli.command {
            Some(Command::Merge(m)) => {
                assert_eq!(m.reports, [PathBuf::from("a/report.json"), PathBuf::from("b/report.json")]);
                assert_eq!(m.report_dir, Some(PathBuf::from("out")));
            }
            other => panic!("expected merge, got {other:?}"),
        }
        assert!(Cli::try_parse_from(["g", "merge"]).is_err(), "at least one report");
    }

    #[test]
    fn bench_defaults_and_lists() {
        let cli = parse(&["g", "bench"]);
        match cli.command {
            Some(Command::Bench(b)) => {
                assert_eq!(b.model, "synth:tiny");
                assert_eq!((b.backend.as_str(), b.policy.as_str()), ("cpu", "fast"));
                assert_eq!(b.prefill, Lengths(vec![1, 64, 512]));
                assert_eq!((b.decode, b.repeats, b.json), (128, 3, None));
            }
            other => panic!("expected bench, got {other:?}"),
        }
        let cli = parse(&["g", "bench", "--prefill", "4, 8", "--decode", "3", "--json", "b.json"]);
        match cli.command {
            Some(Command::Bench(b)) => {
                assert_eq!(b.prefill, Lengths(vec![4, 8]));
                assert_eq!((b.decode, b.json), (3, Some(PathBuf::from("b.json"))));
            }
            other => panic!("expected bench, got {other:?}"),
        }
        for bad in ["1,64,x", "", "1,,2", "0", "1,-2"] {
            let e = Cli::try_parse_from(["g", "bench", "--prefill", bad]).unwrap_err();
            assert!(e.use_stderr(), "{bad}: an error, exit 2");
            assert!(e.to_string().contains("comma-separated token counts"), "{bad}: {e}");
        }
    }

    #[test]
    fn gate_flags_conflict_with_subcommands() {
        let args = ["g", "trace", "--contract", "c"].iter().map(OsString::from).collect::<Vec<_>>();
        assert!(Cli::try_parse_from(args).is_err());
    }

    #[test]
    fn a_word_near_a_subcommand_is_taken_for_a_typo() {
        assert_eq!(subcommand_typo("valdate"), Some("validate"));
        assert_eq!(subcommand_typo("MERG"), Some("merge"));
        assert_eq!(subcommand_typo("lsit"), Some("list"));
        assert_eq!(subcommand_typo("validate"), None, "a subcommand itself is not a typo");
        assert_eq!(subcommand_typo("AC-GPU-MOE-007"), None, "a criterion filter");
        assert_eq!(subcommand_typo("layer02"), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn allow_empty_is_a_gate_and_a_merge_flag() {
        assert!(parse(&["g", "--allow-empty", "x"]).gate.allow_empty);
        assert!(!parse(&["g", "x"]).gate.allow_empty);
        match parse(&["g", "merge", "r.json", "--allow-empty"]).command {
            Some(Command::Merge(m)) => assert!(m.allow_empty),
            other => panic!("expected merge, got {other:?}"),
        }
    }

    #[test]
    fn bad_token_list_is_rejected() {
        let args = ["g", "trace", "--model", "m", "--tokens", "1,x", "--backend", "cpu", "--out", "o"];
        assert!(Cli::try_parse_from(args.iter().map(OsString::from)).is_err());
    }
}
