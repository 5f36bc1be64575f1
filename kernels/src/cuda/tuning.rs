//! Run-time tuning of the kernels' load batches, for trying a variant on a device without a rebuild.
//!
//! `MOE_GATE_CUDA_TUNE="DEC_BATCH=8,GU_BATCH=4"` compiles the kernels with those `#define`s in place of
//! the shipped values (each is guarded by `#ifndef` in the sources). Every knob is how many chunks a lane
//! loads before it multiplies them: the additions stay in chunk order whatever the batch, so no knob
//! changes a result's bits or a launch's shape, only how many loads are in flight and how many registers
//! that takes. The device's description ([`super::DeviceInfo`]) names the knobs in effect, so a
//! measurement says which variant it measured. Unset, the kernels compile exactly as they ship.

use super::error::CudaError;

/// The environment variable that holds the knobs: `NAME=VALUE` pairs separated by commas.
pub const TUNE_ENV: &str = "MOE_GATE_CUDA_TUNE";

/// The knobs and what each sets (all in chunks of 8 weights per lane; `kernels/src/cuda/*.cu`).
pub const KNOBS: [(&str, &str); 5] = [
    ("CHUNK_BATCH", "the batched products' (prefill) chunks per batch"),
    ("DEC_BATCH", "the single-token products' chunks per pipelined batch"),
    ("GU_BATCH", "moe_gate_up1's chunks per row per pipelined batch"),
    ("DC_BATCH", "moe_down_combine1's chunks per row per batch"),
    ("ROUTER_BATCH", "the fused router's chunks per batch"),
];

/// The largest value a knob takes: beyond it a lane's raw chunks no longer fit in registers.
pub const MAX_KNOB: u32 = 16;

/// The knobs' names, comma-separated (for messages).
pub(crate) fn knob_names() -> String {
    KNOBS.map(|(name, _)| name).join(", ")
}

/// The knobs set for one compile, in the order given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tuning {
    knobs: Vec<(&'static str, u32)>,
}

impl Tuning {
    /// The knobs of [`TUNE_ENV`] (none when it is unset or empty).
    pub fn from_env() -> Result<Tuning, CudaError> {
        match std::env::var(TUNE_ENV) {
            Ok(spec) => Tuning::parse(&spec),
            Err(_) => Ok(Tuning::default()),
        }
    }

    /// Parses `NAME=VALUE[,NAME=VALUE...]` (spaces around items allowed).
    pub fn parse(spec: &str) -> Result<Tuning, CudaError> {
        let fail = |reason: String| CudaError::Tuning { spec: spec.to_string(), reason };
        let mut knobs: Vec<(&'static str, u32)> = Vec::new();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (name, value) =
                item.split_once('=').ok_or_else(|| fail(format!("`{item}` is not NAME=VALUE")))?;
            let (name, value) = (name.trim(), value.trim());
            let known = KNOBS
                .iter()
                .map(|(k, _)| *k)
                .find(|k| *k == name)
                .ok_or_else(|| fail(format!("`{name}` is not a knob")))?;
            let value: u32 =
                value.parse().map_err(|_| fail(format!("`{value}` ({name}) is not a number")))?;
            if value == 0 || value > MAX_KNOB {
                return Err(fail(format!("{name}={value} is outside 1..={MAX_KNOB}")));
            }
            if knobs.iter().any(|(k, _)| *k == known) {
                return Err(fail(format!("{name} is given twice")));
            }
            knobs.push((known, value));
        }
        Ok(Tuning { knobs })
    }

    /// Whether no knob is set (the kernels as they ship).
    pub fn is_default(&self) -> bool {
        self.knobs.is_empty()
    }

    /// The NVRTC options that set the knobs (`-DNAME=VALUE`).
    pub fn nvrtc_options(&self) -> Vec<String> {
        self.knobs.iter().map(|(k, v)| format!("-D{k}={v}")).collect()
    }
}

impl std::fmt::Display for Tuning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let items: Vec<String> = self.knobs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        f.write_str(&items.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_knobs_in_order_and_writes_their_defines() {
        let t = Tuning::parse(" DEC_BATCH=8, GU_BATCH = 4 ,").unwrap();
        assert_eq!(t.nvrtc_options(), ["-DDEC_BATCH=8", "-DGU_BATCH=4"]);
        assert_eq!(t.to_string(), "DEC_BATCH=8,GU_BATCH=4");
        assert!(!t.is_default());
        assert!(Tuning::parse("").unwrap().is_default());
    }

    #[test]
    fn refuses_what_is_not_a_knob_or_a_value() {
        for (spec, says) in [
            ("DEC_ROWS=2", "`DEC_ROWS` is not a knob"),
            ("DEC_BATCH", "is not NAME=VALUE"),
            ("DEC_BATCH=eight", "is not a number"),
            ("DEC_BATCH=0", "outside 1..=16"),
            ("DEC_BATCH=17", "outside 1..=16"),
            ("DEC_BATCH=4,DEC_BATCH=8", "given twice"),
        ] {
            let e = Tuning::parse(spec).unwrap_err().to_string();
            assert!(e.contains(says), "{spec}: {e}");
            assert!(e.contains(TUNE_ENV) && e.contains("CHUNK_BATCH"), "{spec}: {e}");
        }
    }

    /// Each knob is a guarded `#define` of the sources, so `-DNAME=VALUE` replaces it; a knob whose
    /// define lost its guard would make NVRTC warn about a redefinition and keep the shipped value.
    #[test]
    fn every_knob_is_a_guarded_define_of_the_sources() {
        let src = crate::cuda::program_source();
        for (name, _) in KNOBS {
            let guarded = format!("#ifndef {name}\n#define {name} ");
            assert_eq!(src.matches(&guarded).count(), 1, "{name}: expected one `#ifndef {name}` + `#define`");
            assert_eq!(src.matches(&format!("#define {name} ")).count(), 1, "{name} is defined twice");
        }
    }
}
