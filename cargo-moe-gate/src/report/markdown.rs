//! `report.md`: the terminal summary's content as a markdown page, for CI artefacts and pull requests.

use super::table::Table;
use super::terminal::{criterion_result, diagnosis_text};
use super::{GateReport, TrialStatus, fmt_value};

/// The markdown report.
pub fn render(report: &GateReport) -> String {
    let c = &report.contract;
    let m = &report.model;
    let mut out = format!("# moe-gate: {} {}\n\n", c.id, c.version);
    out.push_str(&format!("**{}**\n\n", report.verdict.line));
    out.push_str(&format!("- contract: `{}` ({}), status {}: {}\n", c.id, c.path, c.status, c.title));
    out.push_str(&format!("- model: `{}` ({}: {}), {} layers\n", m.spec, m.source, m.reason, m.n_layer));
    if let Some(p) = &report.partition {
        out.push_str(&format!(
            "- **{p}** ({}): one shard; the contract's verdict needs every shard, joined by \
             `cargo moe-gate merge`\n",
            p.prompts.join(", ")
        ));
    }
    if !report.shards.is_empty() {
        out.push_str(&format!("- merged from {} shards (see Shards below)\n", report.shards.len()));
    }
    if report.cuda.needed {
        let cuda = if report.cuda.available {
            "available".to_string()
        } else {
            format!("unavailable ({})", report.cuda.reason.as_deref().unwrap_or("unknown"))
        };
        out.push_str(&format!("- cuda: {cuda}; {} trials ignored\n", report.verdict.ignored));
    }
    out.push_str(&format!("- tool: {}, report schema {}\n", report.tool, report.schema_version));

    out.push_str("\n## Criteria\n\n");
    let mut t =
        Table::new(["criterion", "title", "compare", "metric", "threshold", "gate", "passed", "verdict"]);
    for c in &report.criteria {
        let (result, verdict) = criterion_result(c);
        let blocking = if c.blocking { "" } else { " (advisory)" };
        t.row([
            format!("{}{blocking}", c.id),
            c.title.clone(),
            format!("{} vs {}", c.compare[0], c.compare[1]),
            format!("{} of {}", c.metric, c.tap),
            c.threshold.clone(),
            c.gate.clone(),
            result,
            verdict.to_string(),
        ]);
    }
    out.push_str(&t.to_markdown());

    out.push_str(&layers(report));
    out.push_str(&argmax(report));
    out.push_str(&ties(report));
    out.push_str(&greedy(report));
    out.push_str(&diagnoses(report));
    out.push_str(&failures(report));
    out.push_str(&timings(report));
    out.push_str(&shards(report));
    out
}

fn layers(report: &GateReport) -> String {
    if report.layers.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "\n## Per layer\n\nWorst value over prompts (and which prompt); ✗ marks a failed trial.\n\n",
    );
    for table in &report.layers {
        out.push_str(&format!("### {} ({})\n\n", table.criterion, table.metric));
        let mut t = Table::new(["layer", "worst", "prompt", ""]);
        for r in &table.rows {
            t.row([
                r.layer.to_string(),
                fmt_value(table.metric, r.worst),
                r.worst_prompt.clone(),
                if r.failed { "✗".into() } else { String::new() },
            ]);
        }
        out.push_str(&t.to_markdown());
        out.push('\n');
    }
    out.push_str("The per-layer plot is `layers.svg` next to this file.\n");
    out
}

fn argmax(report: &GateReport) -> String {
    if report.argmax.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "\n## Next token\n\nArgmax at the last position: token (logit, margin to the runner-up).\n\n",
    );
    let mut t = Table::new(["prompt", "tokens", "agree"]);
    for row in &report.argmax {
        let tokens: Vec<String> = row
            .runs
            .iter()
            .map(|r| {
                let text = super::terminal::token_text(r.text.as_deref());
                format!("{}: {}{text} ({:.4}, {:.2e})", r.run, r.token, r.logit, r.margin)
            })
            .collect();
        t.row([
            row.prompt.clone(),
            tokens.join("; "),
            if row.agree { "yes".into() } else { "**no**".into() },
        ]);
    }
    out.push_str(&t.to_markdown());
    out
}

fn greedy(report: &GateReport) -> String {
    if report.greedy.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "\n## Greedy decode\n\nThe tokens each run decoded greedily after the prompt, and their text.\n\n",
    );
    let mut t = Table::new(["prompt", "run", "tokens", "text"]);
    let cell = |text: Option<&str>| text.map(crate::text::quoted).unwrap_or_default();
    for row in &report.greedy {
        for r in &row.runs {
            let ids: Vec<String> = r.tokens.iter().map(u32::to_string).collect();
            let prompt = match &row.prompt_text {
                Some(text) => format!("{} {}", row.prompt, cell(Some(text))),
                None => row.prompt.clone(),
            };
            t.row([prompt, r.run.clone(), ids.join(" "), cell(r.text.as_deref())]);
        }
    }
    out.push_str(&t.to_markdown());
    if !report.greedy.iter().all(|g| g.agree) {
        out.push_str("\nRuns differ on some prompts: see the greedy criterion's trials and diagnosis.\n");
    }
    out
}

fn diagnoses(report: &GateReport) -> String {
    if report.diagnoses.is_empty() {
        return String::new();
    }
    let mut out = String::from("\n## Diagnosis\n\n```text\n");
    for d in &report.diagnoses {
        out.push_str(&diagnosis_text(d, ""));
    }
    out.push_str("```\n");
    out
}

/// Every first routing difference that explains a failure, certified as a tie or not.
fn ties(report: &GateReport) -> String {
    if report.ties.is_empty() {
        return String::new();
    }
    let mut out = String::from("\n## Router ties\n\n");
    let mut t = Table::new([
        "prompt",
        "runs",
        "where",
        "swaps",
        "reference gap",
        "isolated nmse",
        "certified",
        "trials",
    ]);
    for tie in &report.ties {
        let swaps = crate::ties::swaps_text(tie, ", ", "pos ");
        let iso: Vec<String> = tie.isolated.iter().map(|i| format!("{} {:.2e}", i.run, i.nmse)).collect();
        t.row([
            tie.prompt.clone(),
            format!("{} vs {}", tie.runs[0], tie.runs[1]),
            tie.at(),
            swaps,
            tie.gap.map_or("-".into(), |g| format!("{g:.3e}")),
            iso.join(", "),
            if tie.certified { "yes".into() } else { format!("no: {}", tie.reason) },
            tie.trials.len().to_string(),
        ]);
    }
    out.push_str(&t.to_markdown());
    out
}

fn failures(report: &GateReport) -> String {
    let listed: Vec<_> = report
        .trials
        .iter()
        .filter(|t| {
            matches!(
                t.status,
                TrialStatus::Failed | TrialStatus::UnexpectedPass | TrialStatus::ExpectedFailure
            )
        })
        .collect();
    if listed.is_empty() {
        return String::new();
    }
    let mut out = String::from("\n## Failed trials\n\n");
    let mut t = Table::new(["trial", "status", "detail"]);
    for trial in listed {
        let mut detail = trial.detail.clone();
        if let Some(kd) = &trial.known_divergence {
            detail.push_str(&format!(" (known divergence: {kd})"));
        }
        t.row([format!("`{}`", trial.name), trial.status.word().to_string(), detail.replace('\n', " ")]);
    }
    out.push_str(&t.to_markdown());
    out
}

fn timings(report: &GateReport) -> String {
    let t = &report.timings;
    let mut table = Table::new(["phase", "seconds", "work"]);
    table.row(["model".to_string(), format!("{:.3}", t.model_s), report.model.spec.clone()]);
    for r in &t.runs {
        table.row([
            format!("run `{}`", r.run),
            format!("{:.3}", r.seconds),
            format!(
                "{} {}, {} prompts, {} tokens, {} greedy steps",
                r.backend, r.policy, r.prompts, r.tokens, r.greedy_steps
            ),
        ]);
    }
    table.row(["evaluation".to_string(), format!("{:.3}", t.evaluation_s), String::new()]);
    table.row(["diagnosis".to_string(), format!("{:.3}", t.diagnosis_s), String::new()]);
    table.row(["total".to_string(), format!("{:.3}", t.total_s), String::new()]);
    format!("\n## Timings\n\n{}", table.to_markdown())
}

fn shards(report: &GateReport) -> String {
    if report.shards.is_empty() {
        return String::new();
    }
    let mut t = Table::new(["partition", "prompts", "shard verdict", "seconds", "report"]);
    for s in &report.shards {
        t.row([
            format!("{}/{}", s.partition.index, s.partition.count),
            format!("{} of {}", s.partition.prompts.len(), s.partition.total_prompts),
            s.line.clone(),
            format!("{:.3}", s.timings.total_s),
            format!("`{}`", s.report),
        ]);
    }
    format!(
        "\n## Shards\n\nThe timings above are summed over the shards; each shard's own verdict covers its \
         prompts only.\n\n{}",
        t.to_markdown()
    )
}

#[cfg(test)]
mod tests {
    use super::super::sample;
    use super::*;

    #[test]
    fn markdown_says_what_a_shard_and_a_merge_cover() {
        let md = render(&sample::shard());
        assert!(md.contains("- **partition 2/3: 2 of 5 prompts** (p_a, p_d): one shard;"), "{md}");
        let md = render(&sample::merged());
        assert!(md.contains("- merged from 2 shards"), "{md}");
        assert!(md.contains("| 2/2 | 1 of 2 | shard 2's line | 0.500 | `shard-2/report.json` |"), "{md}");
    }

    #[test]
    fn markdown_has_verdict_tables_and_failures() {
        let md = render(&sample::report());
        assert!(
            md.starts_with("# moe-gate: c-v1 1.0.0\n\n**FAILED: blocking gate HID does not hold**"),
            "{md}"
        );
        assert!(md.contains("| HID | hidden states agree | cpu vs reference | cosine of hidden | min 0.9999 | all | 3/4 | FAILS |"), "{md}");
        assert!(md.contains("| 1 | 0.950000000 | p_b | ✗ |"), "{md}");
        assert!(md.contains("| `c-v1::HID::p_b::layer01` | FAILED | cosine 0.95 |"), "{md}");
        assert!(md.contains("| run `cpu` | 0.250 | cpu fast, 2 prompts, 5 tokens, 0 greedy steps |"), "{md}");
        assert!(md.contains("first divergent layer: 1"), "{md}");
    }
}
