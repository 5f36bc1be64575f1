//! The contract as written: serde types that mirror the YAML (docs/contracts.md) with unknown fields rejected
//! and every value that a semantic check may point at wrapped in `Spanned`, so the error can name its
//! line and column. `validate` turns this into the typed [`crate::Contract`].

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_saphyr::Spanned;

use crate::schema::{AmendmentKind, Gate, Metric, Mode, OnlyOn, Per, Status, Tap, TiePolicy};

/// A value with the place it was written.
pub(crate) type S<T> = Spanned<T>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawContract {
    pub contract: S<String>,
    pub version: S<String>,
    pub status: S<Status>,
    pub title: S<String>,
    pub model: S<String>,
    pub smoke_model: S<String>,
    pub prompts: S<Vec<RawPromptSet>>,
    pub runs: S<RunMap>,
    pub criteria: S<Vec<RawCriterion>>,
    pub ties: Option<S<RawTies>>,
    #[serde(default)]
    pub known_divergences: Vec<RawDivergence>,
    pub amendments: S<Vec<RawAmendment>>,
}

/// A prompt set as written: `tokens` for an explicit prompt, `text` for a prompt in words (tokenised
/// with the model's own tokenizer), `count`/`min_len`/`max_len`/`seed` (and optionally `vocab`) for a
/// generated set. One struct rather than an untagged enum, so that a
/// mix of both forms gets a precise error and every field keeps its location.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPromptSet {
    pub id: S<String>,
    pub tokens: Option<S<Vec<S<u32>>>>,
    pub text: Option<S<String>>,
    pub count: Option<S<usize>>,
    pub min_len: Option<S<usize>>,
    pub max_len: Option<S<usize>>,
    pub seed: Option<S<u64>>,
    pub vocab: Option<S<u32>>,
    pub only_on: Option<S<OnlyOn>>,
}

/// The `runs:` mapping, in file order, with each id's location. (A map type would lose both; duplicate
/// ids are rejected by the parser.)
#[derive(Debug)]
pub(crate) struct RunMap(pub Vec<(S<String>, RawRun)>);

impl<'de> Deserialize<'de> for RunMap {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RunMapVisitor;

        impl<'de> Visitor<'de> for RunMapVisitor {
            type Value = RunMap;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping from run ids to {backend, policy}")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RunMap, A::Error> {
                let mut runs = Vec::new();
                while let Some(id) = map.next_key::<S<String>>()? {
                    runs.push((id, map.next_value()?));
                }
                Ok(RunMap(runs))
            }
        }

        deserializer.deserialize_map(RunMapVisitor)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRun {
    pub backend: S<String>,
    pub policy: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCriterion {
    pub id: S<String>,
    pub title: S<String>,
    pub compare: S<Vec<S<String>>>,
    pub tap: S<Tap>,
    pub metric: S<Metric>,
    pub per: Option<S<Vec<S<Per>>>>,
    pub threshold: Option<S<RawThreshold>>,
    pub gate: Option<S<Gate>>,
    pub tie_margin: Option<S<f64>>,
    pub steps: Option<S<usize>>,
    pub blocking: Option<bool>,
    pub reference: Option<S<String>>,
    pub prompts: Option<S<Vec<S<String>>>>,
    pub mode: Option<S<Mode>>,
}

/// `ties: {policy, margin, isolated_nmse, reference}`, every field optional.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTies {
    pub policy: Option<S<TiePolicy>>,
    pub margin: Option<S<f64>>,
    pub isolated_nmse: Option<S<f64>>,
    pub reference: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawThreshold {
    pub min: Option<f64>,
    pub max: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDivergence {
    pub criterion: S<String>,
    #[serde(rename = "where")]
    pub at: Option<S<RawScope>>,
    pub status: S<String>,
    #[serde(default)]
    pub strict: bool,
    pub note: S<String>,
    /// Why masking this much is safe: required where the entry masks a whole criterion (`where: all`) or
    /// a whole prompt set.
    pub reason: Option<S<String>>,
}

/// `where:` as written: the word `all` (every trial of the criterion), or a mapping narrowing it.
#[derive(Debug)]
pub(crate) enum RawScope {
    All,
    Some(Box<RawWhere>),
}

impl<'de> Deserialize<'de> for RawScope {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScopeVisitor;

        impl<'de> Visitor<'de> for ScopeVisitor {
            type Value = RawScope;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`all`, or a mapping of `prompt`, `layer` and/or `layers`")
            }

            fn visit_str<E: de::Error>(self, s: &str) -> Result<RawScope, E> {
                match s {
                    "all" => Ok(RawScope::All),
                    other => Err(E::custom(format!(
                        "`where: {other}`: write `where: all` (with a `reason`) or a mapping such as \
                         `{{prompt: P, layer: L}}`"
                    ))),
                }
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawScope, A::Error> {
                RawWhere::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(|w| RawScope::Some(Box::new(w)))
            }
        }

        deserializer.deserialize_any(ScopeVisitor)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawWhere {
    pub prompt: Option<S<String>>,
    pub layer: Option<S<usize>>,
    pub layers: Option<S<RawLayers>>,
}

/// `layers: {from: A, to: B}`: layers A..=B; either end may be left out (from the first layer, to the
/// last).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLayers {
    pub from: Option<usize>,
    pub to: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAmendment {
    pub version: S<String>,
    pub date: S<String>,
    pub kind: S<AmendmentKind>,
    pub summary: S<String>,
}

/// `gate:` is `all`, `"N/M"` (1 <= N <= M) or a fraction in (0, 1].
impl<'de> Deserialize<'de> for Gate {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct GateVisitor;

        impl Visitor<'_> for GateVisitor {
            type Value = Gate;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"`all`, "N/M" or a fraction in (0, 1]"#)
            }

            fn visit_str<E: de::Error>(self, s: &str) -> Result<Gate, E> {
                parse_gate(s).map_err(E::custom)
            }

            fn visit_f64<E: de::Error>(self, x: f64) -> Result<Gate, E> {
                fraction_gate(x).map_err(E::custom)
            }

            fn visit_u64<E: de::Error>(self, x: u64) -> Result<Gate, E> {
                fraction_gate(x as f64).map_err(E::custom)
            }

            fn visit_i64<E: de::Error>(self, x: i64) -> Result<Gate, E> {
                fraction_gate(x as f64).map_err(E::custom)
            }
        }

        deserializer.deserialize_any(GateVisitor)
    }
}

fn parse_gate(s: &str) -> Result<Gate, String> {
    if s == "all" {
        return Ok(Gate::All);
    }
    let Some((n, of)) = s.split_once('/') else {
        return Err(format!(r#"gate `{s}` is not `all`, "N/M" or a fraction"#));
    };
    let parse = |part: &str| part.trim().parse::<usize>().ok();
    match (parse(n), parse(of)) {
        (Some(n), Some(of)) if n >= 1 && n <= of => Ok(Gate::AtLeast { n, of }),
        (Some(n), Some(of)) => Err(format!("gate `{s}` needs 1 <= N <= M, got N = {n}, M = {of}")),
        _ => Err(format!("gate `{s}`: N and M of \"N/M\" must be whole numbers")),
    }
}

fn fraction_gate(x: f64) -> Result<Gate, String> {
    if x > 0.0 && x <= 1.0 {
        Ok(Gate::Fraction(x))
    } else {
        Err(format!("gate fraction {x} is outside (0, 1]"))
    }
}
