//! JUnit XML, the format CI systems (GitLab, Jenkins, GitHub test reporters) ingest: one `<testsuite>` per
//! criterion, one `<testcase>` per trial, `<failure>` for unexpected failures and passes, `<skipped>` for
//! ignored and filtered-out trials. Expected failures are passing test cases with the known divergence in
//! `<system-out>`.

use std::fmt::Write;

use super::{GateReport, TrialReport, TrialStatus};

/// The JUnit XML document.
pub fn render(report: &GateReport) -> String {
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let failures = report.trials.iter().filter(|t| t.status.is_failure()).count();
    let skipped = report.trials.iter().filter(|t| is_skipped(&t.status)).count();
    let scope = report.partition.as_ref().map(|p| format!(" {p}")).unwrap_or_default();
    let _ = writeln!(
        out,
        "<testsuites name=\"{}{}\" tests=\"{}\" failures=\"{failures}\" skipped=\"{skipped}\" time=\"{:.3}\">",
        esc(&report.contract.id),
        esc(&scope),
        report.trials.len(),
        report.timings.total_s
    );
    if let Some(why) = &report.verdict.incomplete {
        let _ = writeln!(
            out,
            "  <testsuite name=\"{0}::incomplete\" tests=\"1\" failures=\"0\" errors=\"1\" skipped=\"0\">\n    \
             <testcase name=\"{0}::incomplete\" classname=\"{0}\" time=\"0\">\n      \
             <error message=\"{1}\">{1}</error>\n    </testcase>\n  </testsuite>",
            esc(&report.contract.id),
            esc(why)
        );
    }
    for criterion in &report.criteria {
        let trials: Vec<&TrialReport> =
            report.trials.iter().filter(|t| t.criterion == criterion.id).collect();
        let failures = trials.iter().filter(|t| t.status.is_failure()).count();
        let skipped = trials.iter().filter(|t| is_skipped(&t.status)).count();
        let _ = writeln!(
            out,
            "  <testsuite name=\"{}::{}\" tests=\"{}\" failures=\"{failures}\" errors=\"0\" skipped=\"{skipped}\">",
            esc(&report.contract.id),
            esc(&criterion.id),
            trials.len()
        );
        for trial in trials {
            out.push_str(&testcase(report, trial));
        }
        out.push_str("  </testsuite>\n");
    }
    out.push_str("</testsuites>\n");
    out
}

fn is_skipped(status: &TrialStatus) -> bool {
    matches!(status, TrialStatus::Ignored(_) | TrialStatus::FilteredOut)
}

fn testcase(report: &GateReport, t: &TrialReport) -> String {
    let classname = format!("{}::{}", report.contract.id, t.criterion);
    let mut out =
        format!("    <testcase name=\"{}\" classname=\"{}\" time=\"0\"", esc(&t.name), esc(&classname));
    let message = |kind: &str, msg: &str| {
        format!("      <{kind} message=\"{}\">{}</{kind}>\n", esc(msg), esc(&t.detail))
    };
    let body = match &t.status {
        TrialStatus::Passed => None,
        TrialStatus::Failed => Some(message("failure", &t.detail)),
        TrialStatus::UnexpectedPass => Some(message(
            "failure",
            "unexpected pass: a strict known divergence no longer diverges; update the contract",
        )),
        TrialStatus::ExpectedFailure => Some(format!(
            "      <system-out>expected failure (known divergence: {}): {}</system-out>\n",
            esc(t.known_divergence.as_deref().unwrap_or("")),
            esc(&t.detail)
        )),
        TrialStatus::TieExcused(reason) => {
            Some(format!("      <system-out>{}: {}</system-out>\n", esc(reason), esc(&t.detail)))
        }
        TrialStatus::Ignored(reason) => Some(format!("      <skipped message=\"{}\"/>\n", esc(reason))),
        TrialStatus::FilteredOut => Some("      <skipped message=\"filtered out\"/>\n".to_string()),
    };
    match body {
        None => out.push_str("/>\n"),
        Some(body) => {
            out.push_str(">\n");
            out.push_str(&body);
            out.push_str("    </testcase>\n");
        }
    }
    out
}

/// Escapes text for XML attributes and content; drops characters XML 1.0 cannot hold.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\n' => out.push_str("&#10;"),
            '\t' | '\r' => out.push(' '),
            c if (c as u32) < 0x20 => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::sample;
    use super::*;

    #[test]
    fn junit_counts_and_escapes() {
        let xml = render(&sample::report());
        assert!(xml.contains("<testsuites name=\"c-v1\" tests=\"5\" failures=\"1\" skipped=\"1\""), "{xml}");
        assert!(xml.contains("<testsuite name=\"c-v1::HID\" tests=\"4\" failures=\"1\""), "{xml}");
        assert!(
            xml.contains("<testcase name=\"c-v1::HID::p_b::layer01\" classname=\"c-v1::HID\" time=\"0\">\n      <failure message=\"cosine 0.95\">"),
            "{xml}"
        );
        assert!(
            xml.contains("<testcase name=\"c-v1::HID::p_a::layer00\" classname=\"c-v1::HID\" time=\"0\"/>")
        );
        assert_eq!(esc("a<b & \"c\"\n\u{1}"), "a&lt;b &amp; &quot;c&quot;&#10;");
    }

    #[test]
    fn a_shard_names_its_partition() {
        let xml = render(&sample::shard());
        assert!(xml.contains("<testsuites name=\"c-v1 partition 2/3: 2 of 5 prompts\" tests=\"5\""), "{xml}");
    }

    #[test]
    fn junit_is_balanced() {
        let xml = render(&sample::report());
        assert_eq!(xml.matches("<testsuite ").count(), xml.matches("</testsuite>").count());
        let open = xml.matches("<testcase ").count();
        let self_closed = xml.matches("time=\"0\"/>").count();
        assert_eq!(open - self_closed, xml.matches("</testcase>").count());
    }
}
