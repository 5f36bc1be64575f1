//! Semantic validation (docs/contracts.md, issue 4 item 2): turns the contract as written into the typed
//! [`Contract`], checking what the schema alone cannot: semver versions and an amendment history that
//! ends at `version`, unique ids, references that exist, thresholds that suit the metric, taps that
//! suit the metric and `per`, and generated prompt sets that make sense. The first problem found is
//! returned, located at the value that causes it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_saphyr::Spanned;

use crate::error::{ContractError, SourceLocation};
use crate::raw::{
    RawAmendment, RawContract, RawCriterion, RawDivergence, RawLayers, RawPromptSet, RawScope, RawTies,
    RawWhere, RunMap, S,
};
use crate::schema::{
    Amendment, AmendmentKind, BackendKind, Bound, Contract, Criterion, DIVERGENCE_STATUSES, Gate,
    KnownDivergence, LayerSpan, Metric, Mode, Per, Policy, PromptSet, QWEN3_VOCAB, RunSpec, Tap, Threshold,
    Ties,
};

/// The longest generated prompt: far beyond any parity check's needs, and it keeps a typo like
/// `max_len: 64000` from asking for gigabytes of traces.
pub const MAX_GENERATED_LEN: usize = 4096;

/// The most prompts one generated set may hold, for the same reason.
pub const MAX_GENERATED_COUNT: usize = 10_000;

/// The most greedy decode steps a criterion may ask for.
pub const MAX_GREEDY_STEPS: usize = 4096;

type Result<T> = std::result::Result<T, ContractError>;

/// Validates a parsed contract read from `path` whose text is `src`.
pub(crate) fn validate(raw: RawContract, src: &str, path: &Path) -> Result<Contract> {
    let v = Validator { src, path };
    let contract = v.id(&raw.contract, "contract")?;
    let version = v.semver(&raw.version)?;
    let title = v.text(&raw.title, "title")?;
    let model = v.text(&raw.model, "model")?;
    let smoke_model = v.text(&raw.smoke_model, "smoke_model")?;
    let prompts = v.prompt_sets(&raw.prompts)?;
    let names = PromptNames::of(&prompts);
    let runs = v.runs(&raw.runs)?;
    let criteria = v.criteria(&raw.criteria, &runs, &names)?;
    let ties = v.ties(raw.ties.as_ref(), &runs)?;
    let known_divergences = v.divergences(&raw.known_divergences, &criteria, &prompts, &names)?;
    let amendments = v.amendments(&raw.amendments, &version)?;
    Ok(Contract {
        contract,
        version,
        status: raw.status.value,
        title,
        model,
        smoke_model,
        prompts,
        runs,
        criteria,
        ties,
        known_divergences,
        amendments,
        path: path.to_path_buf(),
    })
}

/// Whether `name` is the id of a prompt set that holds more than the one prompt of that id (a generated
/// set), rather than one prompt.
fn is_set_name(name: &str, sets: &[PromptSet]) -> bool {
    sets.iter().any(|s| s.id() == name && matches!(s, PromptSet::Generated { .. }))
}

/// What a broad known divergence masks, for its note.
fn broad_scope(d: &RawDivergence) -> String {
    match d.at.as_ref().map(|w| &w.value) {
        Some(RawScope::Some(w)) => match &w.prompt {
            Some(p) => format!("every prompt of set `{}`", p.value),
            None => format!("every trial of `{}`", d.criterion.value),
        },
        _ => format!("every trial of `{}`", d.criterion.value),
    }
}

/// The names a criterion or known divergence may use for prompts: set ids and expanded prompt ids.
struct PromptNames {
    sets: BTreeSet<String>,
    prompts: BTreeSet<String>,
}

impl PromptNames {
    fn of(sets: &[PromptSet]) -> Self {
        Self {
            sets: sets.iter().map(|s| s.id().to_string()).collect(),
            prompts: sets.iter().flat_map(PromptSet::ids).collect(),
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.sets.contains(name) || self.prompts.contains(name)
    }
}

struct Validator<'a> {
    src: &'a str,
    path: &'a Path,
}

impl Validator<'_> {
    fn at<T>(&self, value: &Spanned<T>) -> SourceLocation {
        SourceLocation::at(self.path, self.src, value.referenced)
    }

    fn fail<T, U>(
        &self,
        value: &Spanned<T>,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> Result<U> {
        Err(ContractError::invalid(self.at(value), message, hint))
    }

    /// An id that can stand in a trial name `CONTRACT::CRITERION::PROMPT::layerNN` and a libtest filter.
    fn id(&self, id: &S<String>, what: &str) -> Result<String> {
        let s = &id.value;
        if s.is_empty() {
            return self.fail(id, format!("the {what} id is empty"), "give it a name");
        }
        if let Some(c) = s.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))) {
            return self.fail(
                id,
                format!("{what} id `{s}` contains `{c}`"),
                "ids appear in trial names (CONTRACT::CRITERION::PROMPT::layerNN): use ASCII letters, \
                 digits, `_`, `-` and `.`",
            );
        }
        Ok(s.clone())
    }

    fn text(&self, text: &S<String>, field: &str) -> Result<String> {
        if text.value.trim().is_empty() {
            return self.fail(text, format!("`{field}` is empty"), "write what it is");
        }
        Ok(text.value.clone())
    }

    fn semver(&self, version: &S<String>) -> Result<semver::Version> {
        semver::Version::parse(&version.value).or_else(|e| {
            self.fail(
                version,
                format!("`{}` is not a semantic version ({e})", version.value),
                "write MAJOR.MINOR.PATCH, e.g. 1.0.0",
            )
        })
    }

    fn prompt_sets(&self, sets: &S<Vec<RawPromptSet>>) -> Result<Vec<PromptSet>> {
        if sets.value.is_empty() {
            return self.fail(
                sets,
                "`prompts` is empty",
                "add at least one prompt: {id: NAME, tokens: [...]}",
            );
        }
        let mut out = Vec::with_capacity(sets.value.len());
        let mut ids: BTreeSet<String> = BTreeSet::new();
        for raw in &sets.value {
            let set = self.prompt_set(raw)?;
            // A generated set's own id is a name too (criteria may select the whole set); an explicit
            // prompt's set id is its prompt id.
            let own = matches!(set, PromptSet::Generated { .. }).then(|| set.id().to_string());
            for name in own.into_iter().chain(set.ids()) {
                if !ids.insert(name.clone()) {
                    return self.fail(
                        &raw.id,
                        format!("prompt id `{name}` is used twice"),
                        "rename one of them (a generated set `X` names its prompts `X_00`, `X_01`, ...)",
                    );
                }
            }
            out.push(set);
        }
        Ok(out)
    }

    fn prompt_set(&self, raw: &RawPromptSet) -> Result<PromptSet> {
        let id = self.id(&raw.id, "prompt")?;
        let only_on = raw.only_on.as_ref().map(|o| o.value);
        let generated =
            [raw.count.is_some(), raw.min_len.is_some(), raw.max_len.is_some(), raw.seed.is_some()];
        if let Some(text) = &raw.text {
            if raw.tokens.is_some() || generated.iter().any(|&g| g) || raw.vocab.is_some() {
                return self.fail(
                    &raw.id,
                    format!("prompt `{id}` has `text` and also `tokens` or generator fields"),
                    "keep `text` for one prompt in words, `tokens` for one prompt in ids, or `count`, \
                     `min_len`, `max_len`, `seed` for a generated set",
                );
            }
            if text.value.is_empty() {
                return self.fail(
                    text,
                    format!("prompt `{id}` has an empty `text`"),
                    "write the prompt's text",
                );
            }
            return Ok(PromptSet::Text { id, text: text.value.clone(), tokens: None, only_on });
        }
        match &raw.tokens {
            Some(tokens) => {
                if generated.iter().any(|&g| g) || raw.vocab.is_some() {
                    return self.fail(
                        &raw.id,
                        format!("prompt `{id}` has both `tokens` and generator fields"),
                        "keep `tokens` for one explicit prompt, or `count`, `min_len`, `max_len`, `seed` \
                         (and optionally `vocab`) for a generated set",
                    );
                }
                self.explicit_tokens(&id, tokens)?;
                let tokens = tokens.value.iter().map(|t| t.value).collect();
                Ok(PromptSet::Explicit { id, tokens, only_on })
            }
            None => {
                let (Some(count), Some(min_len), Some(max_len), Some(seed)) =
                    (&raw.count, &raw.min_len, &raw.max_len, &raw.seed)
                else {
                    return self.fail(
                        &raw.id,
                        format!("prompt `{id}` has neither `tokens`, `text` nor all of `count`, `min_len`, `max_len`, `seed`"),
                        "give `tokens: [...]` or `text: \"...\"` for one prompt, or all four generator fields for a generated set",
                    );
                };
                self.generator(count, min_len, max_len, raw.vocab.as_ref())?;
                Ok(PromptSet::Generated {
                    id,
                    count: count.value,
                    min_len: min_len.value,
                    max_len: max_len.value,
                    seed: seed.value,
                    vocab: raw.vocab.as_ref().map(|v| v.value),
                    only_on,
                })
            }
        }
    }

    fn explicit_tokens(&self, id: &str, tokens: &S<Vec<S<u32>>>) -> Result<()> {
        if tokens.value.is_empty() {
            return self.fail(tokens, format!("prompt `{id}` has no tokens"), "list at least one token id");
        }
        match tokens.value.iter().find(|t| t.value >= QWEN3_VOCAB) {
            Some(t) => self.fail(
                t,
                format!(
                    "token {} of prompt `{id}` is outside the vocabulary ({QWEN3_VOCAB} tokens)",
                    t.value
                ),
                "every model this gate runs has the Qwen3 vocabulary: use ids below 151936",
            ),
            None => Ok(()),
        }
    }

    fn generator(
        &self,
        count: &S<usize>,
        min_len: &S<usize>,
        max_len: &S<usize>,
        vocab: Option<&S<u32>>,
    ) -> Result<()> {
        if count.value == 0 || count.value > MAX_GENERATED_COUNT {
            return self.fail(
                count,
                format!("`count: {}` is outside 1..={MAX_GENERATED_COUNT}", count.value),
                "ask for at least one prompt and at most a few thousand",
            );
        }
        if min_len.value == 0 {
            return self.fail(min_len, "`min_len: 0` would generate empty prompts", "use min_len >= 1");
        }
        if max_len.value < min_len.value || max_len.value > MAX_GENERATED_LEN {
            return self.fail(
                max_len,
                format!("`max_len: {}` is outside {}..={MAX_GENERATED_LEN}", max_len.value, min_len.value),
                "use min_len <= max_len <= 4096",
            );
        }
        match vocab {
            Some(v) if v.value == 0 || v.value > QWEN3_VOCAB => self.fail(
                v,
                format!("`vocab: {}` is outside 1..={QWEN3_VOCAB}", v.value),
                "leave it out to draw from the whole Qwen3 vocabulary",
            ),
            _ => Ok(()),
        }
    }

    fn runs(&self, runs: &S<RunMap>) -> Result<BTreeMap<String, RunSpec>> {
        if runs.value.0.is_empty() {
            return self.fail(
                runs,
                "`runs` is empty",
                "declare the runs the criteria compare, e.g. cpu: {backend: cpu}",
            );
        }
        let mut out = BTreeMap::new();
        for (id, raw) in &runs.value.0 {
            let id = self.id(id, "run")?;
            let backend = self.parsed(&raw.backend, "backend", &BackendKind::ALL.map(|b| b.as_str()))?;
            let policy = match &raw.policy {
                Some(p) => self.parsed(p, "policy", &Policy::ALL.map(|p| p.as_str()))?,
                None => Policy::Fast,
            };
            out.insert(id, RunSpec { backend, policy });
        }
        Ok(out)
    }

    fn parsed<T: std::str::FromStr>(&self, value: &S<String>, field: &str, valid: &[&str]) -> Result<T> {
        value.value.parse().or_else(|_| {
            self.fail(
                value,
                format!("unknown {field} `{}`", value.value),
                format!("use one of: {}", valid.join(", ")),
            )
        })
    }

    fn criteria(
        &self,
        raw: &S<Vec<RawCriterion>>,
        runs: &BTreeMap<String, RunSpec>,
        names: &PromptNames,
    ) -> Result<Vec<Criterion>> {
        if raw.value.is_empty() {
            return self.fail(raw, "`criteria` is empty", "a contract needs at least one criterion");
        }
        let mut seen = BTreeSet::new();
        let mut out = Vec::with_capacity(raw.value.len());
        for c in &raw.value {
            let criterion = self.criterion(c, runs, names)?;
            if !seen.insert(criterion.id.clone()) {
                return self.fail(
                    &c.id,
                    format!("criterion id `{}` is used twice", criterion.id),
                    "rename one",
                );
            }
            out.push(criterion);
        }
        Ok(out)
    }

    fn criterion(
        &self,
        c: &RawCriterion,
        runs: &BTreeMap<String, RunSpec>,
        names: &PromptNames,
    ) -> Result<Criterion> {
        let id = self.id(&c.id, "criterion")?;
        let title = self.text(&c.title, "title")?;
        let compare = self.compare(c, runs)?;
        let (tap, metric) = (c.tap.value, c.metric.value);
        self.tap_suits_metric(c)?;
        let per = self.per(c)?;
        let threshold = self.threshold(c)?;
        let tie_margin = self.tie_margin(c)?;
        let steps = self.steps(c)?;
        let reference = self.reference(c, runs)?;
        let prompts = self.criterion_prompts(c, names)?;
        let mode = self.mode(c)?;
        Ok(Criterion {
            id,
            title,
            compare,
            tap,
            metric,
            per,
            threshold,
            gate: c.gate.as_ref().map_or(Gate::All, |g| g.value),
            tie_margin,
            steps,
            blocking: c.blocking.unwrap_or(true),
            reference,
            prompts,
            mode,
        })
    }

    /// `mode: isolated` needs a per-layer tap and a metric that compares two runs' layer outputs.
    fn mode(&self, c: &RawCriterion) -> Result<Mode> {
        let Some(mode) = &c.mode else { return Ok(Mode::Accumulated) };
        if mode.value == Mode::Isolated {
            if !c.tap.value.is_per_layer() {
                return self.fail(
                    mode,
                    format!("`mode: isolated` runs each layer alone, and tap {} has no layers", c.tap.value),
                    "use tap hidden, router_logits, router_experts or router_weights, or remove `mode`",
                );
            }
            if c.metric.value == Metric::ErrorRatio {
                return self.fail(
                    mode,
                    "error_ratio measures both runs' own forwards against the reference; it has no isolated form",
                    "remove `mode`, or compare the isolated layers with cosine or nmse",
                );
            }
        }
        Ok(mode.value)
    }

    /// The `ties:` section, defaults for what it leaves out.
    fn ties(&self, raw: Option<&S<RawTies>>, runs: &BTreeMap<String, RunSpec>) -> Result<Ties> {
        let mut ties = Ties { reference: default_reference(runs), ..Ties::default() };
        let Some(raw) = raw else { return Ok(ties) };
        let raw = &raw.value;
        if let Some(p) = &raw.policy {
            ties.policy = p.value;
        }
        if let Some(m) = &raw.margin {
            if !(m.value > 0.0 && m.value < 1.0) {
                return self.fail(
                    m,
                    format!("`ties.margin: {}` is outside (0, 1)", m.value),
                    "it is a difference of router probabilities, e.g. 1.0e-5",
                );
            }
            ties.margin = m.value;
        }
        if let Some(n) = &raw.isolated_nmse {
            if !(n.value > 0.0 && n.value.is_finite()) {
                return self.fail(
                    n,
                    format!("`ties.isolated_nmse: {}` is not a positive number", n.value),
                    "it bounds one layer's nmse against the reference, e.g. 1.0e-8",
                );
            }
            ties.isolated_nmse = n.value;
        }
        if let Some(r) = &raw.reference {
            match runs.get(&r.value) {
                None => return self.unknown_run(r, runs),
                Some(spec) if spec.backend != BackendKind::Reference => {
                    return self.fail(
                        r,
                        format!(
                            "run `{}` runs on {}, and only a reference run can certify a tie",
                            r.value, spec.backend
                        ),
                        "name a run with `backend: reference`, or leave `ties.reference` out",
                    );
                }
                Some(_) => ties.reference = Some(r.value.clone()),
            }
        }
        Ok(ties)
    }

    fn compare(&self, c: &RawCriterion, runs: &BTreeMap<String, RunSpec>) -> Result<[String; 2]> {
        let [candidate, baseline] = c.compare.value.as_slice() else {
            return self.fail(
                &c.compare,
                format!("`compare` lists {} runs", c.compare.value.len()),
                "list exactly two run ids: [candidate, baseline]",
            );
        };
        for run in [candidate, baseline] {
            if !runs.contains_key(&run.value) {
                return self.unknown_run(run, runs);
            }
        }
        if candidate.value == baseline.value {
            return self.fail(
                baseline,
                format!("`compare` names `{}` twice", baseline.value),
                "compare two different runs",
            );
        }
        Ok([candidate.value.clone(), baseline.value.clone()])
    }

    fn unknown_run<U>(&self, run: &S<String>, runs: &BTreeMap<String, RunSpec>) -> Result<U> {
        let known: Vec<&str> = runs.keys().map(String::as_str).collect();
        self.fail(
            run,
            format!("run `{}` is not declared under `runs`", run.value),
            format!("use one of: {} (or declare it)", known.join(", ")),
        )
    }

    fn tap_suits_metric(&self, c: &RawCriterion) -> Result<()> {
        let (tap, metric) = (c.tap.value, c.metric.value);
        let (suits, needed) = match metric {
            Metric::Cosine | Metric::Nmse | Metric::MaxAbs => (
                tap.is_float(),
                "hidden, router_logits, router_weights or logits (router_experts holds ids: use topk_set or bitwise)",
            ),
            Metric::Kld | Metric::Argmax | Metric::Greedy => (tap == Tap::Logits, "logits"),
            Metric::TopkSet => (tap == Tap::RouterExperts, "router_experts"),
            // Router weights are renormalised over each side's own chosen experts, so their distance to
            // the reference mixes routing with arithmetic.
            Metric::ErrorRatio => (
                matches!(tap, Tap::Hidden | Tap::RouterLogits | Tap::Logits),
                "hidden, router_logits or logits",
            ),
            // Bits compare on every tap.
            Metric::Bitwise => (true, ""),
        };
        if suits {
            return Ok(());
        }
        self.fail(&c.metric, format!("metric {metric} cannot compare tap {tap}"), format!("use tap {needed}"))
    }

    fn per(&self, c: &RawCriterion) -> Result<Vec<Per>> {
        let Some(per) = &c.per else { return Ok(vec![Per::Prompt]) };
        let mut out: Vec<Per> = Vec::new();
        for p in &per.value {
            if out.contains(&p.value) {
                return self.fail(p, format!("`per` lists {} twice", p.value), "list each once");
            }
            if p.value == Per::Layer && !c.tap.value.is_per_layer() {
                return self.fail(
                    p,
                    format!("tap {} has no layers, so there is no trial per layer", c.tap.value),
                    "remove `layer` from `per`",
                );
            }
            if p.value != Per::Prompt && c.metric.value == Metric::Greedy {
                return self.fail(p, "greedy decoding is judged once per prompt", "use `per: [prompt]`");
            }
            out.push(p.value);
        }
        if !out.contains(&Per::Prompt) {
            return self.fail(
                per,
                "`per` lacks `prompt`",
                "every trial reads one prompt's traces: write per: [prompt], [prompt, layer] or [prompt, position]",
            );
        }
        out.sort();
        Ok(out)
    }

    fn threshold(&self, c: &RawCriterion) -> Result<Threshold> {
        let metric = c.metric.value;
        let Some(raw) = &c.threshold else {
            return match metric.bound() {
                None => Ok(Threshold::default()),
                Some(bound) => self.fail(
                    &c.metric,
                    format!("metric {metric} needs a threshold"),
                    format!("add `threshold: {{{}: VALUE}}`", bound_name(bound)),
                ),
            };
        };
        let t = Threshold { min: raw.value.min, max: raw.value.max };
        if let Some(x) = t.min.into_iter().chain(t.max).find(|x| !x.is_finite()) {
            return self.fail(raw, format!("threshold {x} is not a finite number"), "use a finite bound");
        }
        match (metric.bound(), t.min, t.max) {
            (None, _, _) => self.fail(
                raw,
                format!("metric {metric} takes no threshold (it passes on exact agreement)"),
                "remove `threshold`",
            ),
            (Some(Bound::Min), Some(min), None) if (-1.0..=1.0).contains(&min) => Ok(t),
            (Some(Bound::Min), Some(min), None) => self.fail(
                raw,
                format!("cosine min {min} is outside [-1, 1]"),
                "a cosine bound lies in [-1, 1], e.g. 0.9999",
            ),
            (Some(Bound::Max), None, Some(max)) if metric == Metric::ErrorRatio && max <= 0.0 => self.fail(
                raw,
                format!(
                    "error_ratio max {max} would pass only a candidate that reproduces the reference exactly"
                ),
                "bound the ratio of the two errors, e.g. max: 1.5",
            ),
            (Some(Bound::Max), None, Some(max)) if max >= 0.0 => Ok(t),
            (Some(Bound::Max), None, Some(max)) => self.fail(
                raw,
                format!("{metric} max {max} is negative, so nothing could pass"),
                "use a bound >= 0",
            ),
            (Some(bound), _, _) => self.fail(
                raw,
                format!("metric {metric} is bounded by `{}` only", bound_name(bound)),
                format!("write `threshold: {{{}: VALUE}}`", bound_name(bound)),
            ),
        }
    }

    fn tie_margin(&self, c: &RawCriterion) -> Result<Option<f64>> {
        let Some(m) = &c.tie_margin else { return Ok(None) };
        if c.metric.value != Metric::TopkSet {
            return self.fail(m, "`tie_margin` only applies to metric topk_set", "remove it");
        }
        if !(m.value > 0.0 && m.value < 1.0) {
            return self.fail(
                m,
                format!("`tie_margin: {}` is outside (0, 1)", m.value),
                "it is a difference of router probabilities, e.g. 1.0e-5",
            );
        }
        Ok(Some(m.value))
    }

    fn steps(&self, c: &RawCriterion) -> Result<Option<usize>> {
        match (&c.steps, c.metric.value) {
            (None, Metric::Greedy) => self.fail(
                &c.metric,
                "metric greedy needs `steps`",
                "add `steps: N` (the greedy decode steps compared)",
            ),
            (Some(s), Metric::Greedy) if s.value == 0 || s.value > MAX_GREEDY_STEPS => self.fail(
                s,
                format!("`steps: {}` is outside 1..={MAX_GREEDY_STEPS}", s.value),
                "use e.g. steps: 32",
            ),
            (Some(s), Metric::Greedy) => Ok(Some(s.value)),
            (Some(s), _) => self.fail(s, "`steps` only applies to metric greedy", "remove it"),
            (None, _) => Ok(None),
        }
    }

    fn reference(&self, c: &RawCriterion, runs: &BTreeMap<String, RunSpec>) -> Result<Option<String>> {
        if let Some(r) = &c.reference {
            if !runs.contains_key(&r.value) {
                return self.unknown_run(r, runs);
            }
            if c.metric.value == Metric::ErrorRatio && c.compare.value.iter().any(|run| run.value == r.value)
            {
                return self.fail(
                    r,
                    format!(
                        "error_ratio measures both compared runs against `{}`, which is one of them",
                        r.value
                    ),
                    "name a third run as `reference`, e.g. one with backend reference",
                );
            }
            return Ok(Some(r.value.clone()));
        }
        if c.metric.value == Metric::ErrorRatio {
            return self.fail(
                &c.metric,
                "metric error_ratio needs `reference`: the run both compared runs are measured against",
                "add `reference: RUN`, e.g. `reference: reference` for a run with backend reference",
            );
        }
        let default = default_reference(runs);
        if let (Some(m), None) = (&c.tie_margin, &default) {
            return self.fail(
                m,
                "`tie_margin` needs a reference run to certify ties, and there is none",
                "declare `reference: {backend: reference}` under `runs` or name one with `reference: RUN`",
            );
        }
        Ok(default)
    }

    fn criterion_prompts(&self, c: &RawCriterion, names: &PromptNames) -> Result<Option<Vec<String>>> {
        let Some(list) = &c.prompts else { return Ok(None) };
        if list.value.is_empty() {
            return self.fail(
                list,
                "`prompts: []` selects no prompt",
                "remove the field to use every prompt",
            );
        }
        let mut out: Vec<String> = Vec::new();
        for name in &list.value {
            if !names.contains(&name.value) {
                return self.fail(
                    name,
                    format!("prompt `{}` is not declared under `prompts`", name.value),
                    "use a prompt id or a prompt set id declared at the top level",
                );
            }
            if out.contains(&name.value) {
                return self.fail(name, format!("prompt `{}` is listed twice", name.value), "list each once");
            }
            out.push(name.value.clone());
        }
        Ok(Some(out))
    }

    fn divergences(
        &self,
        raw: &[RawDivergence],
        criteria: &[Criterion],
        sets: &[PromptSet],
        names: &PromptNames,
    ) -> Result<Vec<KnownDivergence>> {
        let mut out: Vec<KnownDivergence> = Vec::new();
        for d in raw {
            let kd = self.divergence(d, criteria, sets, names)?;
            let same = |o: &KnownDivergence| {
                o.criterion == kd.criterion && o.prompt == kd.prompt && o.layers == kd.layers
            };
            if out.iter().any(same) {
                return self.fail(
                    &d.criterion,
                    format!("a known divergence of `{}` with the same `where` is listed twice", kd.criterion),
                    "merge them into one entry",
                );
            }
            out.push(kd);
        }
        Ok(out)
    }

    fn divergence(
        &self,
        d: &RawDivergence,
        criteria: &[Criterion],
        sets: &[PromptSet],
        names: &PromptNames,
    ) -> Result<KnownDivergence> {
        let Some(criterion) = criteria.iter().find(|c| c.id == d.criterion.value) else {
            let known: Vec<&str> = criteria.iter().map(|c| c.id.as_str()).collect();
            return self.fail(
                &d.criterion,
                format!(
                    "known divergence names criterion `{}`, which the contract does not have",
                    d.criterion.value
                ),
                format!("use one of: {}", known.join(", ")),
            );
        };
        let narrowed = match d.at.as_ref().map(|w| &w.value) {
            Some(RawScope::Some(w)) => Some(&**w),
            _ => None,
        };
        let prompt = narrowed.and_then(|w| w.prompt.as_ref());
        if let Some(p) = prompt {
            self.divergence_prompt(p, criterion, sets, names)?;
        }
        let layers = match narrowed {
            Some(w) => self.divergence_layers(w, criterion)?,
            None => None,
        };
        let reason = self.divergence_breadth(d, sets)?;
        if !DIVERGENCE_STATUSES.contains(&d.status.value.as_str()) {
            return self.fail(
                &d.status,
                format!("unknown known-divergence status `{}`", d.status.value),
                format!("use one of: {}", DIVERGENCE_STATUSES.join(", ")),
            );
        }
        let note = self.text(&d.note, "note")?;
        Ok(KnownDivergence {
            criterion: criterion.id.clone(),
            prompt: prompt.map(|p| p.value.clone()),
            layers,
            status: d.status.value.clone(),
            strict: d.strict,
            note: match reason {
                Some(reason) => format!("{note} (masks {}: {reason})", broad_scope(d)),
                None => note,
            },
        })
    }

    /// A mask too broad to be safe is refused unless the entry says so: no `where` (every trial of the
    /// criterion), or `where.prompt` naming a prompt set (every prompt of the set). The explicit forms are
    /// `where: all` and a set name, each with a `reason`, which is returned; a `reason` on a narrow entry
    /// is refused too, so the word always marks a broad mask.
    fn divergence_breadth(&self, d: &RawDivergence, sets: &[PromptSet]) -> Result<Option<String>> {
        let Some(at) = &d.at else {
            return self.fail(
                &d.criterion,
                format!("a known divergence of `{}` without `where` would mask every trial of it", d.criterion.value),
                "narrow it with `where: {prompt: P, layer: L}`, or write `where: all` with a `reason` if every \
                 trial of the criterion is really expected to fail",
            );
        };
        let set = match &at.value {
            RawScope::All => None,
            RawScope::Some(w) => w.prompt.as_ref().filter(|p| is_set_name(&p.value, sets)),
        };
        let broad = matches!(at.value, RawScope::All) || set.is_some();
        match (&d.reason, broad) {
            (Some(reason), true) => self.text(reason, "reason").map(Some),
            (None, true) => match set {
                Some(p) => self.fail(
                    p,
                    format!(
                        "`where.prompt: {}` names a prompt set, so the entry masks every prompt of it",
                        p.value
                    ),
                    "name the prompts that diverge (one entry each), or add a `reason` saying why the whole \
                     set is expected to fail",
                ),
                None => self.fail(
                    at,
                    format!("`where: all` masks every trial of `{}`", d.criterion.value),
                    "add a `reason` saying why every trial is expected to fail, or narrow `where`",
                ),
            },
            (Some(reason), false) => self.fail(
                reason,
                "`reason` justifies a broad mask (`where: all` or a prompt set), and this entry is narrow",
                "drop `reason` and say why it diverges in `note`",
            ),
            (None, false) => Ok(None),
        }
    }

    /// The layers of `where`: `layer: L` or `layers: {from, to}` (not both), on a per-layer criterion.
    fn divergence_layers(&self, w: &RawWhere, criterion: &Criterion) -> Result<Option<LayerSpan>> {
        let span = match (&w.layer, &w.layers) {
            (None, None) => return Ok(None),
            (Some(_), Some(both)) => {
                return self.fail(
                    both,
                    "`where` has both `layer` and `layers`",
                    "give `layer: L` for one layer or `layers: {from: A, to: B}` for a range, not both",
                );
            }
            (Some(l), None) => (LayerSpan::one(l.value), self.at(l)),
            (None, Some(r)) => {
                let RawLayers { from, to } = r.value;
                let (from, to): (Option<usize>, Option<usize>) = (from, to);
                if from.is_none() && to.is_none() {
                    return self.fail(r, "`layers` gives neither `from` nor `to`", {
                        "give `from`, `to` or both (both included), or leave `layers` out for every layer"
                    });
                }
                let from = from.unwrap_or(0);
                if let Some(to) = to
                    && to < from
                {
                    return self.fail(
                        r,
                        format!("`layers` runs from {from} down to {to}"),
                        "give `from` <= `to` (both included)",
                    );
                }
                let span = LayerSpan { from, to };
                (span, self.at(r))
            }
        };
        let (span, at) = span;
        if !criterion.is_per(Per::Layer) {
            return Err(ContractError::invalid(
                at,
                format!(
                    "criterion `{}` has no trial per layer, so a divergence at {span} never matches",
                    criterion.id
                ),
                "remove `layer` / `layers`, or add `layer` to the criterion's `per`",
            ));
        }
        Ok(Some(span))
    }

    fn divergence_prompt(
        &self,
        p: &S<String>,
        criterion: &Criterion,
        sets: &[PromptSet],
        names: &PromptNames,
    ) -> Result<()> {
        if !names.contains(&p.value) {
            return self.fail(
                p,
                format!("prompt `{}` is not declared under `prompts`", p.value),
                "use a prompt id or a prompt set id declared at the top level",
            );
        }
        let Some(selected) = &criterion.prompts else { return Ok(()) };
        let set_of = |prompt: &str| sets.iter().find(|s| s.ids().iter().any(|e| e == prompt)).map(|s| s.id());
        let covered = selected.iter().any(|sel| {
            sel == &p.value || set_of(&p.value) == Some(sel.as_str()) || set_of(sel) == Some(p.value.as_str())
        });
        if covered {
            return Ok(());
        }
        self.fail(
            p,
            format!("criterion `{}` does not run prompt `{}`, so this never matches", criterion.id, p.value),
            format!("use one of the criterion's prompts: {}", selected.join(", ")),
        )
    }

    fn amendments(&self, raw: &S<Vec<RawAmendment>>, version: &semver::Version) -> Result<Vec<Amendment>> {
        let Some(newest) = raw.value.first() else {
            return self.fail(
                raw,
                "`amendments` is empty",
                "record at least the `created` amendment of this version",
            );
        };
        let out: Vec<Amendment> = raw.value.iter().map(|a| self.amendment(a)).collect::<Result<_>>()?;
        if &out[0].version != version {
            return self.fail(
                &newest.version,
                format!(
                    "the newest amendment is {}, but the contract's version is {version}",
                    out[0].version
                ),
                "amendments are newest first: add one for the new version, or set `version` to match",
            );
        }
        for (i, pair) in out.windows(2).enumerate() {
            let (newer, older, at) = (&pair[0], &pair[1], &raw.value[i + 1]);
            if newer.version <= older.version {
                return self.fail(
                    &at.version,
                    format!("amendment {} is listed after {}", older.version, newer.version),
                    "list amendments newest first, each with a higher version than the one below it",
                );
            }
            if newer.date < older.date {
                return self.fail(
                    &at.date,
                    format!(
                        "amendment {} ({}) is dated after the newer {} ({})",
                        older.version, older.date, newer.version, newer.date
                    ),
                    "fix the dates: newest first",
                );
            }
            if newer.kind.is_loosening()
                && older.version.major >= 1
                && newer.version.major == older.version.major
            {
                return self.fail(
                    &raw.value[i].version,
                    format!(
                        "loosening amendment {} keeps major version {}",
                        newer.version, older.version.major
                    ),
                    "a looser contract breaks what users of the old one relied on: bump the major version",
                );
            }
        }
        for (i, a) in out.iter().enumerate() {
            let is_oldest = i + 1 == out.len();
            if (a.kind == AmendmentKind::Created) != is_oldest {
                let message = match is_oldest {
                    true => format!("the oldest amendment ({}) is not `created`", a.version),
                    false => format!("amendment {} is `created` but is not the oldest", a.version),
                };
                return self.fail(
                    &raw.value[i].kind,
                    message,
                    "exactly one amendment, the oldest (last), has kind `created`",
                );
            }
        }
        Ok(out)
    }

    fn amendment(&self, a: &RawAmendment) -> Result<Amendment> {
        let version = self.semver(&a.version)?;
        if !is_iso_date(&a.date.value) {
            return self.fail(
                &a.date,
                format!("date `{}` is not a calendar date", a.date.value),
                "write YYYY-MM-DD",
            );
        }
        let summary = self.text(&a.summary, "summary")?;
        Ok(Amendment { version, date: a.date.value.clone(), kind: a.kind.value, summary })
    }
}

/// The run a criterion uses for ties and diagnosis when it names none: the run called `reference`,
/// else the only run with the reference backend.
fn default_reference(runs: &BTreeMap<String, RunSpec>) -> Option<String> {
    if runs.contains_key("reference") {
        return Some("reference".to_string());
    }
    let mut refs = runs.iter().filter(|(_, r)| r.backend == BackendKind::Reference);
    match (refs.next(), refs.next()) {
        (Some((id, _)), None) => Some(id.clone()),
        _ => None,
    }
}

fn bound_name(bound: Bound) -> &'static str {
    match bound {
        Bound::Min => "min",
        Bound::Max => "max",
    }
}

/// Whether `s` is `YYYY-MM-DD` naming a day of the proleptic Gregorian calendar.
fn is_iso_date(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' || !digits(0..4) || !digits(5..7) || !digits(8..10) {
        return false;
    }
    let num = |r: std::ops::Range<usize>| s[r].parse::<u32>().unwrap_or(0);
    let (year, month, day) = (num(0..4), num(5..7), num(8..10));
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    (1..=days).contains(&day)
}

#[cfg(test)]
mod tests {
    use super::is_iso_date;

    #[test]
    fn dates_follow_the_calendar() {
        assert!(is_iso_date("2026-11-29"));
        assert!(is_iso_date("2024-02-29"));
        assert!(!is_iso_date("2026-02-29"));
        assert!(!is_iso_date("1900-02-29"));
        assert!(is_iso_date("2000-02-29"));
        assert!(!is_iso_date("2026-13-01"));
        assert!(!is_iso_date("2026-1-01"));
        assert!(!is_iso_date("29.11.2026"));
    }
}
