//! Model specs (docs/synthetic-models.md): the one place a model name given to any command becomes weights.
//!
//! A spec is a path to a `.gguf` file, or `synth:PRESET[:QUANT][@SEED]` for a synthetic model built in
//! memory ([`crate::synth`]). QUANT defaults to `q4_k_m` (the format of the model of record), SEED to 0.
//! The canonical form ([`ModelSpec`]'s `Display`) spells every part, so traces record exactly which
//! model they ran.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use crate::gguf::{GgufError, GgufFile};
use crate::synth::SynthModel;
use crate::weights::{ModelError, ModelWeights};

pub use crate::synth::{Preset, QuantMix};

/// The prefix of synthetic specs.
pub const SYNTH_PREFIX: &str = "synth:";

/// The seed of a synthetic spec that names none.
pub const DEFAULT_SEED: u64 = 0;

/// A parsed model spec.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ModelSpec {
    /// A GGUF file on disk.
    Path(PathBuf),
    /// A synthetic model: its shape, its storage mix and the seed of its weights.
    Synth { preset: Preset, quant: QuantMix, seed: u64 },
}

/// Why a spec could not be parsed, or its model loaded, built, written or converted.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    // --- parsing ---
    /// The spec is empty.
    #[error(
        "empty model spec: pass a path to a .gguf file or synth:PRESET[:QUANT][@SEED] (presets: {})",
        Preset::valid_names()
    )]
    Empty,
    /// `synth:` names no known preset.
    #[error("model spec {spec:?}: unknown preset {preset:?}; valid presets are {}", Preset::valid_names())]
    UnknownPreset { spec: String, preset: String },
    /// `synth:PRESET:` names no known quantisation mix.
    #[error("model spec {spec:?}: unknown quant {quant:?}; valid quants are {}", QuantMix::valid_names())]
    UnknownQuant { spec: String, quant: String },
    /// The part after `@` is not a seed.
    #[error("model spec {spec:?}: seed {seed:?} is not a decimal integer in 0..=18446744073709551615")]
    BadSeed { spec: String, seed: String },
    /// The spec has too many parts.
    #[error("model spec {spec:?}: {reason}; the form is synth:PRESET[:QUANT][@SEED], e.g. synth:tiny:q8_0@3")]
    Malformed { spec: String, reason: &'static str },

    // --- loading, writing, converting ---
    /// A GGUF file could not be read, or a GGUF image could not be declared or written.
    #[error("{path}: {source}")]
    Gguf {
        path: String,
        #[source]
        source: GgufError,
    },
    /// The file is GGUF but not a usable Qwen3-MoE model.
    #[error("model {spec}: {source}")]
    Model {
        spec: String,
        #[source]
        source: ModelError,
    },
    /// Creating or writing an output file failed.
    #[error("cannot write {path}: {source}; check that its directory exists and is writable")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The converter was asked to overwrite its own input.
    #[error("{path} is both the input and the output: write the converted model to another file")]
    SameFile { path: PathBuf },
}

impl FromStr for ModelSpec {
    type Err = SpecError;

    fn from_str(spec: &str) -> Result<Self, SpecError> {
        if spec.trim().is_empty() {
            return Err(SpecError::Empty);
        }
        let Some(rest) = spec.strip_prefix(SYNTH_PREFIX) else {
            return Ok(ModelSpec::Path(PathBuf::from(spec)));
        };
        let malformed = |reason| SpecError::Malformed { spec: spec.to_owned(), reason };
        let (body, seed) = match rest.split_once('@') {
            None => (rest, DEFAULT_SEED),
            Some((_, s)) if s.contains('@') => return Err(malformed("more than one '@'")),
            Some((body, s)) => {
                let seed = s.parse::<u64>().ok().filter(|_| s.bytes().all(|b| b.is_ascii_digit()));
                (body, seed.ok_or_else(|| SpecError::BadSeed { spec: spec.to_owned(), seed: s.to_owned() })?)
            }
        };
        let mut parts = body.split(':');
        let preset_name = parts.next().unwrap_or("");
        let quant_name = parts.next();
        if parts.next().is_some() {
            return Err(malformed("more than two ':'-separated parts after synth:"));
        }
        if preset_name.is_empty() {
            return Err(malformed("the preset is missing"));
        }
        let preset = Preset::from_name(preset_name).ok_or_else(|| SpecError::UnknownPreset {
            spec: spec.to_owned(),
            preset: preset_name.to_owned(),
        })?;
        let quant = match quant_name {
            None => QuantMix::default(),
            Some(q) => QuantMix::from_name(q)
                .ok_or_else(|| SpecError::UnknownQuant { spec: spec.to_owned(), quant: q.to_owned() })?,
        };
        Ok(ModelSpec::Synth { preset, quant, seed })
    }
}

impl fmt::Display for ModelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelSpec::Path(path) => write!(f, "{}", path.display()),
            ModelSpec::Synth { preset, quant, seed } => write!(f, "{SYNTH_PREFIX}{preset}:{quant}@{seed}"),
        }
    }
}

impl ModelSpec {
    /// Loads the model: a path is memory-mapped, a synthetic model is built in memory.
    ///
    /// A synthetic model still alive elsewhere in the process is shared rather than built again (the
    /// production shape takes 18.6 GB), so every run of a gate uses one copy. Files are always opened
    /// anew: their contents may change between loads.
    pub fn load(&self) -> Result<Arc<ModelWeights>, SpecError> {
        let (preset, quant, seed) = match self {
            ModelSpec::Path(path) => return self.load_file(path),
            ModelSpec::Synth { preset, quant, seed } => (preset, quant, seed),
        };
        let cache = synth_cache();
        if let Some(weights) =
            cache.lock().unwrap_or_else(PoisonError::into_inner).get(self).and_then(Weak::upgrade)
        {
            return Ok(weights);
        }
        let file = SynthModel::new(*preset, *quant, *seed).build()?;
        let weights = self.validate(file)?;
        let mut cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
        cache.retain(|_, weak| weak.strong_count() > 0);
        cache.insert(self.clone(), Arc::downgrade(&weights));
        Ok(weights)
    }

    fn load_file(&self, path: &Path) -> Result<Arc<ModelWeights>, SpecError> {
        let file = GgufFile::open(path)
            .map_err(|source| SpecError::Gguf { path: path.display().to_string(), source })?;
        self.validate(file)
    }

    fn validate(&self, file: GgufFile) -> Result<Arc<ModelWeights>, SpecError> {
        ModelWeights::from_gguf(Arc::new(file))
            .map(Arc::new)
            .map_err(|source| SpecError::Model { spec: self.to_string(), source })
    }
}

/// The synthetic models alive in this process, by spec.
fn synth_cache() -> &'static Mutex<HashMap<ModelSpec, Weak<ModelWeights>>> {
    static CACHE: std::sync::OnceLock<Mutex<HashMap<ModelSpec, Weak<ModelWeights>>>> =
        std::sync::OnceLock::new();
    CACHE.get_or_init(Mutex::default)
}

/// Parses `spec` and loads its model (see [`ModelSpec::load`]).
pub fn load_model(spec: &str) -> Result<Arc<ModelWeights>, SpecError> {
    spec.parse::<ModelSpec>()?.load()
}

/// Writes the model of a synthetic `spec` to `out` as a GGUF file, streamed tensor by tensor (the model
/// is never whole in memory). A path spec is copied as it is.
pub fn synth_to_file(spec: &ModelSpec, out: &Path) -> Result<(), SpecError> {
    match spec {
        ModelSpec::Synth { preset, quant, seed } => SynthModel::new(*preset, *quant, *seed).write_file(out),
        ModelSpec::Path(path) => std::fs::copy(path, out)
            .map(drop)
            .map_err(|source| SpecError::Write { path: out.to_path_buf(), source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_synth_specs_with_defaults() {
        let parsed: ModelSpec = "synth:tiny".parse().unwrap();
        assert_eq!(parsed, ModelSpec::Synth { preset: Preset::Tiny, quant: QuantMix::Q4_K_M, seed: 0 });
        let parsed: ModelSpec = "synth:qwen3-coder-30b-a3b:q8_0@42".parse().unwrap();
        assert_eq!(
            parsed,
            ModelSpec::Synth { preset: Preset::Qwen3Coder30bA3b, quant: QuantMix::Q8_0, seed: 42 }
        );
        let parsed: ModelSpec = "synth:small@7".parse().unwrap();
        assert_eq!(parsed, ModelSpec::Synth { preset: Preset::Small, quant: QuantMix::Q4_K_M, seed: 7 });
        assert_eq!("synth:SMALL:BF16".parse::<ModelSpec>().unwrap().to_string(), "synth:small:bf16@0");
    }

    #[test]
    fn display_round_trips() {
        for preset in Preset::ALL {
            for quant in QuantMix::ALL {
                let spec = ModelSpec::Synth { preset, quant, seed: 18_446_744_073_709_551_615 };
                assert_eq!(spec.to_string().parse::<ModelSpec>().unwrap(), spec);
            }
        }
    }

    #[test]
    fn anything_else_is_a_path() {
        assert_eq!("models/a.gguf".parse::<ModelSpec>().unwrap(), ModelSpec::Path("models/a.gguf".into()));
        assert_eq!("synth".parse::<ModelSpec>().unwrap(), ModelSpec::Path("synth".into()));
    }

    /// Each malformed spec is refused with the variant that says what is wrong, and the message lists
    /// the valid choices.
    #[test]
    fn malformed_specs_say_what_is_valid() {
        let err = |s: &str| s.parse::<ModelSpec>().unwrap_err();
        assert!(matches!(err(""), SpecError::Empty));
        assert!(matches!(err("  "), SpecError::Empty));
        let unknown = err("synth:huge");
        assert!(matches!(&unknown, SpecError::UnknownPreset { preset, .. } if preset == "huge"));
        let message = unknown.to_string();
        for preset in Preset::ALL {
            assert!(message.contains(preset.name()), "{message}");
        }
        let unknown = err("synth:tiny:q3_k");
        assert!(matches!(&unknown, SpecError::UnknownQuant { quant, .. } if quant == "q3_k"));
        for quant in QuantMix::ALL {
            assert!(unknown.to_string().contains(quant.name()), "{unknown}");
        }
        for bad_seed in [
            "synth:tiny@",
            "synth:tiny@-1",
            "synth:tiny@+1",
            "synth:tiny@x",
            "synth:tiny@18446744073709551616",
        ] {
            assert!(matches!(err(bad_seed), SpecError::BadSeed { .. }), "{bad_seed}");
        }
        assert!(matches!(err("synth:"), SpecError::Malformed { .. }));
        assert!(matches!(err("synth::q8_0"), SpecError::Malformed { .. }));
        assert!(matches!(err("synth:tiny:q8_0:x"), SpecError::Malformed { .. }));
        assert!(matches!(err("synth:tiny@1@2"), SpecError::Malformed { .. }));
    }

    /// A synthetic model alive elsewhere is shared, and built again once every holder has dropped it.
    #[test]
    fn synthetic_models_are_shared_while_alive() {
        let a = load_model("synth:tiny:q8_0@9").unwrap();
        let b = load_model("synth:TINY:q8_0@9").unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        let other_seed = load_model("synth:tiny:q8_0@10").unwrap();
        assert!(!Arc::ptr_eq(&a, &other_seed));
        let weak = Arc::downgrade(&a);
        drop((a, b));
        assert!(weak.upgrade().is_none(), "the cache must not keep a model alive");
        let c = load_model("synth:tiny:q8_0@9").unwrap();
        assert_eq!(c.file.as_bytes().len(), other_seed.file.as_bytes().len());
    }

    #[test]
    fn a_missing_file_names_its_path() {
        let err = load_model("/nonexistent/model.gguf").unwrap_err();
        assert!(matches!(err, SpecError::Gguf { .. }));
        assert!(err.to_string().contains("/nonexistent/model.gguf"), "{err}");
    }
}
