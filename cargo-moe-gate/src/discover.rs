//! Finding the workspace and its contracts (docs/architecture.md): `cargo metadata` gives the workspace root and
//! `[workspace.metadata.moe-gate]` (`contracts-dir`, `default-contract`); `--contract NAME` is
//! `contracts-dir/NAME.yaml`, and a path works anywhere, even outside a workspace.

use std::path::{Path, PathBuf};

use crate::error::GateError;

/// Where the gate finds its contracts.
#[derive(Debug, Clone, PartialEq)]
pub struct Workspace {
    /// The workspace root (the directory of the root Cargo.toml).
    pub root: PathBuf,
    /// `contracts-dir`, resolved against the root (default `contracts`).
    pub contracts_dir: PathBuf,
    /// `default-contract`: the contract run when `--contract` is not given.
    pub default_contract: Option<String>,
}

/// The contracts dir used when `[workspace.metadata.moe-gate]` does not name one.
const DEFAULT_CONTRACTS_DIR: &str = "contracts";

impl Workspace {
    /// Runs `cargo metadata` (no dependency resolution) from the current directory.
    pub fn discover() -> Result<Self, GateError> {
        let metadata = cargo_metadata::MetadataCommand::new().no_deps().exec().map_err(|e| {
            let reason = match e {
                cargo_metadata::Error::CargoMetadata { stderr } => first_error_line(&stderr),
                other => other.to_string(),
            };
            GateError::Workspace { reason }
        })?;
        Self::from_metadata(metadata.workspace_root.into_std_path_buf(), &metadata.workspace_metadata)
    }

    /// Reads `[workspace.metadata.moe-gate]` out of the workspace metadata table.
    pub fn from_metadata(root: PathBuf, workspace_metadata: &serde_json::Value) -> Result<Self, GateError> {
        let manifest = root.join("Cargo.toml");
        let Some(table) = workspace_metadata.get("moe-gate") else {
            return Err(GateError::WorkspaceMetadata {
                manifest,
                field: "moe-gate",
                reason:
                    "missing; add the table with contracts-dir = \"contracts\" and default-contract = \"ID\""
                        .into(),
            });
        };
        let string_field = |field: &'static str| -> Result<Option<String>, GateError> {
            match table.get(field) {
                None => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(GateError::WorkspaceMetadata {
                    manifest: manifest.clone(),
                    field,
                    reason: format!("must be a string, found {other}"),
                }),
            }
        };
        let contracts_dir = string_field("contracts-dir")?.unwrap_or_else(|| DEFAULT_CONTRACTS_DIR.into());
        let default_contract = string_field("default-contract")?;
        Ok(Self { contracts_dir: root.join(contracts_dir), root, default_contract })
    }

    /// The contract files (`*.yaml`, `*.yml`) of the contracts dir, sorted by name.
    pub fn contract_files(&self) -> Result<Vec<PathBuf>, GateError> {
        let entries = std::fs::read_dir(&self.contracts_dir)
            .map_err(|source| GateError::ContractsDir { dir: self.contracts_dir.clone(), source })?;
        let mut files: Vec<PathBuf> =
            entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file() && is_yaml(p)).collect();
        files.sort();
        Ok(files)
    }

    /// The file of contract `name` in the contracts dir.
    pub fn contract_by_name(&self, name: &str) -> Result<PathBuf, GateError> {
        for ext in ["yaml", "yml"] {
            let path = self.contracts_dir.join(format!("{name}.{ext}"));
            if path.is_file() {
                return Ok(path);
            }
        }
        let available = self
            .contract_files()
            .unwrap_or_default()
            .iter()
            .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .collect::<Vec<_>>();
        Err(GateError::ContractNotFound {
            name: name.to_string(),
            dir: self.contracts_dir.clone(),
            available: if available.is_empty() { "none".into() } else { available.join(", ") },
        })
    }
}

/// Resolves `--contract`: a path (anything that names an existing file, ends in `.yaml`/`.yml` or holds
/// a path separator) is used as is; a bare name is looked up in the workspace; nothing means the
/// workspace's `default-contract`.
pub fn locate_contract(arg: Option<&str>) -> Result<PathBuf, GateError> {
    if let Some(arg) = arg
        && looks_like_path(arg)
    {
        return Ok(PathBuf::from(arg));
    }
    let workspace = Workspace::discover()?;
    let name = match arg {
        Some(name) => name.to_string(),
        None => workspace.default_contract.clone().ok_or_else(|| GateError::WorkspaceMetadata {
            manifest: workspace.root.join("Cargo.toml"),
            field: "default-contract",
            reason: "missing, and no --contract given; pass --contract NAME|PATH or set default-contract"
                .into(),
        })?,
    };
    workspace.contract_by_name(&name)
}

/// Whether a `--contract` value is a path rather than a contract id.
fn looks_like_path(arg: &str) -> bool {
    let path = Path::new(arg);
    is_yaml(path) || arg.contains('/') || arg.contains(std::path::MAIN_SEPARATOR) || path.is_file()
}

fn is_yaml(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
}

/// The most telling line of cargo's stderr (its `error:` line, else the first line).
fn first_error_line(stderr: &str) -> String {
    let line = stderr.lines().find(|l| l.starts_with("error")).or_else(|| stderr.lines().next());
    line.unwrap_or("cargo metadata failed without a message").trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn metadata_table_gives_dir_and_default() {
        let ws = Workspace::from_metadata(
            PathBuf::from("/w"),
            &json!({"moe-gate": {"contracts-dir": "specs", "default-contract": "c1"}}),
        )
        .unwrap();
        assert_eq!(ws.contracts_dir, PathBuf::from("/w/specs"));
        assert_eq!(ws.default_contract.as_deref(), Some("c1"));
    }

    #[test]
    fn contracts_dir_defaults_to_contracts() {
        let ws = Workspace::from_metadata(PathBuf::from("/w"), &json!({"moe-gate": {}})).unwrap();
        assert_eq!(ws.contracts_dir, PathBuf::from("/w/contracts"));
        assert_eq!(ws.default_contract, None);
    }

    #[test]
    fn missing_table_and_wrong_types_are_named() {
        let e = Workspace::from_metadata(PathBuf::from("/w"), &json!(null)).unwrap_err().to_string();
        assert!(e.contains("/w/Cargo.toml") && e.contains("moe-gate") && e.contains("missing"), "{e}");
        let e = Workspace::from_metadata(PathBuf::from("/w"), &json!({"moe-gate": {"contracts-dir": 3}}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("contracts-dir: must be a string, found 3"), "{e}");
    }

    #[test]
    fn contract_lookup_by_name_lists_what_exists() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a-v1.yaml"), "x").unwrap();
        std::fs::write(dir.path().join("b-v2.yml"), "x").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
        let ws = Workspace {
            root: dir.path().to_path_buf(),
            contracts_dir: dir.path().to_path_buf(),
            default_contract: None,
        };
        assert_eq!(ws.contract_by_name("b-v2").unwrap(), dir.path().join("b-v2.yml"));
        let e = ws.contract_by_name("zzz").unwrap_err().to_string();
        assert!(e.contains("zzz.yaml") && e.contains("available: a-v1, b-v2"), "{e}");
    }

    #[test]
    fn paths_and_names_are_told_apart() {
        assert!(looks_like_path("contracts/x.yaml"));
        assert!(looks_like_path("x.yml"));
        assert!(looks_like_path("./x"));
        assert!(!looks_like_path("qwen3-moe-forward-gpu-v1"));
    }

    #[test]
    fn cargo_error_line_is_extracted() {
        let s = "warning: something\nerror: could not find `Cargo.toml` in `/tmp` or any parent directory\n";
        assert_eq!(
            first_error_line(s),
            "error: could not find `Cargo.toml` in `/tmp` or any parent directory"
        );
    }
}
