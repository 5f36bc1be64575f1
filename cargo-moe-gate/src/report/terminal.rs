//! The terminal summary printed after libtest's lines (docs/gate.md): per criterion N/M and the gate's
//! verdict, the per-layer worst values, the next-token table, and a diagnosis for every failure.

use super::table::Table;
use super::{CriterionReport, Diagnosis, GateReport, TrialStatus, fmt_value};
use moe_contracts::Metric;

/// Diagnoses shown in the terminal; the files under `--report-dir` hold all of them.
pub const MAX_TERMINAL_DIAGNOSES: usize = 12;

/// Greedy decodes shown in the terminal (one line per prompt); report.md and report.json hold all.
pub const MAX_TERMINAL_GREEDY: usize = 8;

/// The whole summary as text.
pub fn render(report: &GateReport) -> String {
    let mut out = String::new();
    out.push_str(&header(report));
    out.push_str(&criteria_section(report));
    out.push_str(&layers_section(report));
    out.push_str(&argmax_section(report));
    out.push_str(&ties_section(report));
    out.push_str(&greedy_section(report));
    out.push_str(&diagnoses_section(report));
    out.push_str(&timings_line(report));
    out.push_str(&lenient_section(report));
    if let Some(why) = &report.verdict.incomplete {
        out.push_str(&format!("\nINCOMPLETE: {why}\n"));
    }
    out.push_str(&format!("\ngate: {}\n", report.verdict.line));
    out
}

/// The non-strict known divergences, right above the verdict: each masks trials whose passing (a fix,
/// or a change that moves the failure elsewhere) the gate would not notice.
fn lenient_section(report: &GateReport) -> String {
    let lenient = &report.verdict.lenient;
    if lenient.is_empty() {
        return String::new();
    }
    let mut out = format!(
        "\n!! {} non-strict known divergence{} (the gate does not notice when these trials start passing; \
         make them `strict: true` once confirmed):\n",
        lenient.len(),
        if lenient.len() == 1 { "" } else { "s" }
    );
    for entry in lenient {
        out.push_str(&format!("!!   {entry}\n"));
    }
    out
}

fn header(report: &GateReport) -> String {
    let c = &report.contract;
    let m = &report.model;
    let mut out = format!("\nmoe-gate: contract {} {} ({})\n", c.id, c.version, c.path);
    out.push_str(&format!("model: {} ({}: {}), {} layers\n", m.spec, m.source, m.reason, m.n_layer));
    out.push_str(&scope_lines(report));
    if report.cuda.needed {
        match (&report.cuda.reason, report.cuda.available) {
            (_, true) => out.push_str("cuda: available\n"),
            (Some(reason), false) => out.push_str(&format!(
                "cuda: unavailable ({reason}); {} trials that need it are listed as ignored\n",
                report.verdict.ignored
            )),
            (None, false) => out.push_str("cuda: unavailable\n"),
        }
    }
    out
}

/// What part of the contract the report covers: one shard (`--partition K/N`), or every shard merged.
fn scope_lines(report: &GateReport) -> String {
    if let Some(p) = &report.partition {
        return format!(
            "{p} ({}); a shard: the contract's verdict needs every shard's report.json, joined by \
             `cargo moe-gate merge`\n",
            p.prompts.join(", ")
        );
    }
    if report.shards.is_empty() {
        return String::new();
    }
    let mut out = format!("merged from {} shards:\n", report.shards.len());
    for s in &report.shards {
        out.push_str(&format!(
            "  {} (exit {}, {:.2} s): {}\n",
            s.partition, s.exit_code, s.timings.total_s, s.report
        ));
    }
    out
}

/// `N/M` and the verdict of one criterion, as shown in tables.
pub fn criterion_result(c: &CriterionReport) -> (String, &'static str) {
    let mut result = format!("{}/{}", c.passed, c.total);
    let mut extras = Vec::new();
    if c.expected_failures > 0 {
        extras.push(format!("{} expected failures", c.expected_failures));
    }
    if c.tie_excused > 0 {
        extras.push(format!("{} excused as tie cascades", c.tie_excused));
    }
    if !c.unexpected_passes.is_empty() {
        extras.push(format!("{} unexpected passes", c.unexpected_passes.len()));
    }
    if c.ignored > 0 {
        extras.push(format!("{} ignored", c.ignored));
    }
    if !extras.is_empty() {
        result.push_str(&format!(" ({})", extras.join(", ")));
    }
    let nothing_judged =
        c.total == 0 && c.unexpected_passes.is_empty() && c.expected_failures == 0 && c.tie_excused == 0;
    let verdict = match (nothing_judged, c.gate_holds, c.blocking) {
        (true, _, _) => "not judged",
        (false, true, _) => "holds",
        (false, false, true) => "FAILS",
        (false, false, false) => "fails (advisory)",
    };
    (result, verdict)
}

fn criteria_section(report: &GateReport) -> String {
    let mut t =
        Table::new(["criterion", "compare", "tap", "metric", "threshold", "gate", "passed", "verdict"]);
    for c in &report.criteria {
        let (result, verdict) = criterion_result(c);
        t.row([
            c.id.clone(),
            format!("{} vs {}", c.compare[0], c.compare[1]),
            c.tap.clone(),
            c.metric.to_string(),
            c.threshold.clone(),
            c.gate.clone(),
            result,
            verdict.to_string(),
        ]);
    }
    format!("\ncriteria\n{}", t.to_text(2))
}

fn layers_section(report: &GateReport) -> String {
    if report.layers.is_empty() {
        return String::new();
    }
    let mut header = vec!["layer".to_string()];
    header.extend(report.layers.iter().map(|t| format!("{} ({})", t.criterion, t.metric)));
    let mut t = Table::new(header);
    let mut layers: Vec<usize> = report.layers.iter().flat_map(|t| t.rows.iter().map(|r| r.layer)).collect();
    layers.sort_unstable();
    layers.dedup();
    for layer in layers {
        let mut row = vec![layer.to_string()];
        for table in &report.layers {
            row.push(match table.rows.iter().find(|r| r.layer == layer) {
                Some(r) => {
                    format!("{}{}", fmt_value(table.metric, r.worst), if r.failed { " ✗" } else { "  " })
                }
                None => "-  ".into(),
            });
        }
        t.row(row);
    }
    format!("\nper layer: worst value over prompts (✗ = a trial failed)\n{}", t.to_text(2))
}

fn argmax_section(report: &GateReport) -> String {
    if report.argmax.is_empty() {
        return String::new();
    }
    let mut runs: Vec<String> = Vec::new();
    for row in &report.argmax {
        for r in &row.runs {
            if !runs.contains(&r.run) {
                runs.push(r.run.clone());
            }
        }
    }
    let mut header = vec!["prompt".to_string()];
    header.extend(runs.iter().map(|r| format!("{r}: token \"text\" (logit, margin)")));
    header.push("agree".into());
    let mut t = Table::new(header);
    for row in &report.argmax {
        let mut cells = vec![row.prompt.clone()];
        for run in &runs {
            cells.push(match row.runs.iter().find(|r| &r.run == run) {
                Some(r) => {
                    format!("{}{} ({:.4}, {:.2e})", r.token, token_text(r.text.as_deref()), r.logit, r.margin)
                }
                None => "-".into(),
            });
        }
        cells.push(if row.agree { "yes".into() } else { "NO".into() });
        t.row(cells);
    }
    format!("\nnext token at the last position\n{}", t.to_text(2))
}

/// Every first routing difference that explains a failure: certified ties (and the trials they excuse)
/// and swaps that are not ties.
fn ties_section(report: &GateReport) -> String {
    if report.ties.is_empty() {
        return String::new();
    }
    let certified = report.ties.iter().filter(|t| t.certified).count();
    let mut out = format!(
        "\nties (router and next-token): {certified} certified, {} not ({} failing trials explained)\n",
        report.ties.len() - certified,
        report.ties.iter().map(|t| t.trials.len()).sum::<usize>()
    );
    for t in &report.ties {
        let swaps = match crate::ties::swaps_text(t, ", ", "pos ") {
            s if s.is_empty() => String::new(),
            s => format!(" ({s})"),
        };
        let iso: Vec<String> = t.isolated.iter().map(|i| format!("{} {:.1e}", i.run, i.nmse)).collect();
        out.push_str(&format!(
            "  {} {}: {} vs {} at {}{}; reference gap {}; isolated nmse [{}]; {} trials\n    {}\n",
            if t.certified { "CERTIFIED" } else { "NOT A TIE" },
            t.prompt,
            t.runs[0],
            t.runs[1],
            t.at(),
            swaps,
            t.gap.map_or("-".to_string(), |g| format!("{g:.3e}")),
            iso.join(", "),
            t.trials.len(),
            t.reason
        ));
    }
    out
}

/// ` "text"` after a token id, or nothing where the model has no tokenizer.
pub fn token_text(text: Option<&str>) -> String {
    text.map(|t| format!(" {}", crate::text::quoted(t))).unwrap_or_default()
}

/// The greedy decodes as text, one line per prompt (per run where the runs differ).
fn greedy_section(report: &GateReport) -> String {
    if report.greedy.is_empty() || report.greedy.iter().all(|g| g.runs.iter().all(|r| r.text.is_none())) {
        return String::new();
    }
    let mut out = String::from("\ngreedy decode (text; token ids in report.md and report.json)\n");
    for row in report.greedy.iter().take(MAX_TERMINAL_GREEDY) {
        let prompt = match &row.prompt_text {
            Some(text) => format!("{} {}", row.prompt, crate::text::quoted(text)),
            None => row.prompt.clone(),
        };
        if row.agree {
            let text = row.runs[0].text.as_deref().unwrap_or("");
            out.push_str(&format!("  {prompt} -> {} (every run)\n", crate::text::quoted(text)));
        } else {
            out.push_str(&format!("  {prompt} -> runs differ:\n"));
            for r in &row.runs {
                out.push_str(&format!(
                    "    {}: {}\n",
                    r.run,
                    crate::text::quoted(r.text.as_deref().unwrap_or(""))
                ));
            }
        }
    }
    if report.greedy.len() > MAX_TERMINAL_GREEDY {
        out.push_str(&format!("  ... and {} more prompts\n", report.greedy.len() - MAX_TERMINAL_GREEDY));
    }
    out
}

fn diagnoses_section(report: &GateReport) -> String {
    if report.diagnoses.is_empty() {
        return String::new();
    }
    let mut out = String::from("\ndiagnosis\n");
    for d in report.diagnoses.iter().take(MAX_TERMINAL_DIAGNOSES) {
        out.push_str(&diagnosis_text(d, "  "));
    }
    if report.diagnoses.len() > MAX_TERMINAL_DIAGNOSES {
        out.push_str(&format!(
            "  ... and {} more (every diagnosis is in report.md and report.json under --report-dir)\n",
            report.diagnoses.len() - MAX_TERMINAL_DIAGNOSES
        ));
    }
    out
}

/// The lines describing one diagnosis, each prefixed by `indent`.
pub fn diagnosis_text(d: &Diagnosis, indent: &str) -> String {
    let mut out = format!(
        "{indent}{}::{} ({} vs {}, {} failing trials)\n",
        d.criterion,
        d.prompt,
        d.compare[0],
        d.compare[1],
        d.failing_trials.len()
    );
    let item = |s: String| format!("{indent}  - {s}\n");
    if let Some(nf) = &d.non_finite {
        out.push_str(&item(format!("non-finite value: {nf}")));
    }
    if let Some(layer) = d.first_divergent_layer {
        let value = match (d.end_to_end, d.metric) {
            (Some(v), Some(metric)) => format!(" ({metric} {})", fmt_value(metric, v)),
            (Some(v), None) => format!(" (value {v:.4e})"),
            (None, _) => String::new(),
        };
        out.push_str(&item(format!("first divergent layer: {layer}{value}")));
    }
    for iso in &d.isolated {
        out.push_str(&item(format!(
            "isolated layer {} of {} on the reference's input: nmse {}, cosine {}",
            iso.layer,
            iso.run,
            fmt_value(Metric::Nmse, iso.nmse),
            fmt_value(Metric::Cosine, iso.cosine)
        )));
    }
    for b in &d.bisections {
        let step = b.step.map(|s| format!(", decode step {s}")).unwrap_or_default();
        let op = b.op.map_or("none".to_string(), |op| op.to_string());
        out.push_str(&item(format!(
            "op bisection of {} (layer {}{step}): {op}: {}",
            b.run, b.layer, b.sentence
        )));
    }
    if let Some(m) = &d.router_margin {
        out.push_str(&item(format!(
            "reference router margin at the top-{} boundary, layer {}: {} (position {})",
            m.k,
            m.layer,
            fmt_value(Metric::Nmse, m.margin),
            m.position
        )));
    }
    if !d.distance_to_reference.is_empty() {
        let parts: Vec<String> = d
            .distance_to_reference
            .iter()
            .map(|r| format!("{} nmse {} at {}", r.run, fmt_value(Metric::Nmse, r.nmse), r.at))
            .collect();
        let closer = d.closer.as_ref().map(|c| format!("; closer: {c}")).unwrap_or_default();
        out.push_str(&item(format!("distance to the reference: {}{closer}", parts.join(", "))));
    }
    for note in &d.notes {
        out.push_str(&item(format!("note: {note}")));
    }
    out.push_str(&format!("{indent}  => {}\n", d.summary));
    out
}

fn timings_line(report: &GateReport) -> String {
    let t = &report.timings;
    let mut parts = vec![format!("model {:.2} s", t.model_s)];
    for r in &t.runs {
        parts.push(format!("{} {:.2} s ({} prompts, {} tokens)", r.run, r.seconds, r.prompts, r.tokens));
    }
    parts.push(format!("evaluation {:.3} s", t.evaluation_s));
    if t.ties_s > 0.0 {
        parts.push(format!("isolated layers and ties {:.2} s", t.ties_s));
    }
    if t.diagnosis_s > 0.0 {
        parts.push(format!("diagnosis {:.2} s", t.diagnosis_s));
    }
    parts.push(format!("total {:.2} s", t.total_s));
    let summed = match report.shards.len() {
        0 => String::new(),
        n => format!(" (summed over {n} shards)"),
    };
    format!("\ntimings{summed}: {}\n", parts.join("; "))
}

/// The failing trials, one line each (used when there are failures but libtest's own list was filtered).
pub fn failing_trials(report: &GateReport) -> Vec<String> {
    report
        .trials
        .iter()
        .filter(|t| matches!(t.status, TrialStatus::Failed | TrialStatus::UnexpectedPass))
        .map(|t| t.name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::sample;
    use super::*;

    #[test]
    fn summary_has_every_section() {
        let text = render(&sample::report());
        assert!(text.contains("model: synth:tiny (smoke_model: no usable CUDA device"), "{text}");
        assert!(text.contains("cuda: unavailable (built without the `cuda` feature); 1 trials"), "{text}");
        let criteria_line = text.lines().find(|l| l.trim_start().starts_with("HID ")).unwrap();
        assert!(criteria_line.contains("3/4") && criteria_line.ends_with("FAILS"), "{criteria_line}");
        let layer_line = text.lines().find(|l| l.trim_start().starts_with("1 ")).unwrap();
        assert!(layer_line.contains("0.950000000 ✗"), "{layer_line}");
        let argmax_line = text.lines().find(|l| l.trim_start().starts_with("p_a ")).unwrap();
        assert_eq!(argmax_line.matches("17 \"2\" (3.2500, 5.00e-1)").count(), 2, "{argmax_line}");
        assert!(argmax_line.ends_with("yes"), "{argmax_line}");
        assert!(text.contains("first divergent layer: 1"), "{text}");
        assert!(text.contains("- note: isolated layer unavailable: the backend has no run_layer"), "{text}");
        assert!(text.contains("reference router margin at the top-2 boundary, layer 1: 0.2000 (position 2)"));
        assert!(text.contains("gate: FAILED: blocking gate HID does not hold"), "{text}");
    }

    #[test]
    fn a_shard_and_a_merge_say_what_they_cover() {
        let text = render(&sample::shard());
        assert!(
            text.contains("\npartition 2/3: 2 of 5 prompts (p_a, p_d); a shard: the contract's verdict"),
            "{text}"
        );
        let text = render(&sample::merged());
        assert!(text.contains("merged from 2 shards:\n  partition 1/2: 1 of 2 prompts (exit 0, 0.50 s): shard-1/report.json\n"), "{text}");
        assert!(text.contains("\ntimings (summed over 2 shards): model"), "{text}");
        assert!(!render(&sample::report()).contains("partition"));
    }

    #[test]
    fn criterion_verdicts() {
        let mut c = sample::report().criteria[0].clone();
        assert_eq!(criterion_result(&c), ("3/4".to_string(), "FAILS"));
        c.blocking = false;
        assert_eq!(criterion_result(&c).1, "fails (advisory)");
        c.passed = 0;
        c.total = 0;
        c.ignored = 4;
        assert_eq!(criterion_result(&c), ("0/0 (4 ignored)".to_string(), "not judged"));
        c.total = 4;
        c.passed = 4;
        c.gate_holds = true;
        assert_eq!(criterion_result(&c).1, "holds");
    }

    #[test]
    fn failing_trials_are_listed() {
        assert_eq!(failing_trials(&sample::report()), vec!["c-v1::HID::p_b::layer01"]);
    }
}
