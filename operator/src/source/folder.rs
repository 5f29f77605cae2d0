//! A folder of manifests, the same YAML Kubernetes takes: every `*.yaml`/`*.yml` file in it,
//! each possibly holding several documents. Documents of other kinds (Deployments, Services)
//! are skipped, so one folder can serve `kubectl apply` and `ringfence local` alike.
//!
//! A file that fails to load is reported and its last good content stays in use: a typo in the
//! file holding a `deny` rule must not quietly drop the rule.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ringfence_crds::{API_VERSION, Agent, AgentPolicy, GROUP, RunBudget};
use serde::de::DeserializeOwned;

use super::Manifests;
use crate::compile::{ResourceRef, resource_ref};

/// Why a file or a document could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {dir}: {reason}")]
    Dir { dir: PathBuf, reason: String },
    #[error("{file}: {reason}")]
    File { file: PathBuf, reason: String },
    #[error("{file}, document {doc}: {reason}")]
    Document {
        file: PathBuf,
        doc: usize,
        reason: String,
    },
    #[error(
        "{file}, document {doc}: {resource} is also defined in {first}; the first definition is used"
    )]
    Duplicate {
        file: PathBuf,
        doc: usize,
        resource: ResourceRef,
        first: String,
    },
}

#[derive(Debug, Clone)]
enum Resource {
    Agent(Agent),
    Policy(AgentPolicy),
    Budget(RunBudget),
}

/// A folder of manifests, read on demand; remembers each file's last good content.
#[derive(Debug)]
pub struct Folder {
    dir: PathBuf,
    last_good: BTreeMap<PathBuf, Vec<(usize, Resource)>>,
}

/// The outcome of reading the folder once.
#[derive(Debug, Default)]
pub struct Loaded {
    pub manifests: Manifests,
    pub problems: Vec<LoadError>,
    /// Files whose last good content is in use because the current one failed.
    pub stale: Vec<PathBuf>,
}

impl Folder {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            last_good: BTreeMap::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether `path` is a manifest file of this folder (what the watcher cares about).
    pub fn is_manifest(path: &Path) -> bool {
        matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) && !path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'))
    }

    /// Reads every manifest file now.
    pub fn load(&mut self) -> Loaded {
        let mut out = Loaded::default();
        let mut files: Vec<PathBuf> = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && Self::is_manifest(p))
                .collect(),
            Err(e) => {
                out.problems.push(LoadError::Dir {
                    dir: self.dir.clone(),
                    reason: e.to_string(),
                });
                return out;
            }
        };
        files.sort();
        self.last_good.retain(|f, _| files.contains(f));

        for file in files {
            let resources = match read_file(&file) {
                Ok(rs) => {
                    self.last_good.insert(file.clone(), rs.clone());
                    rs
                }
                Err(mut errs) => {
                    out.problems.append(&mut errs);
                    match self.last_good.get(&file) {
                        Some(rs) => {
                            out.stale.push(file.clone());
                            rs.clone()
                        }
                        None => continue,
                    }
                }
            };
            for (doc, r) in resources {
                add(&mut out, &file, doc, r);
            }
        }
        out
    }
}

fn add(out: &mut Loaded, file: &Path, doc: usize, mut r: Resource) {
    // Like kubectl: a manifest without a namespace lands in `default`.
    let meta = match &mut r {
        Resource::Agent(a) => &mut a.metadata,
        Resource::Policy(p) => &mut p.metadata,
        Resource::Budget(b) => &mut b.metadata,
    };
    meta.namespace.get_or_insert_with(|| "default".to_owned());
    let rr = match &r {
        Resource::Agent(a) => resource_ref("Agent", &a.metadata),
        Resource::Policy(p) => resource_ref("AgentPolicy", &p.metadata),
        Resource::Budget(b) => resource_ref("RunBudget", &b.metadata),
    };
    if let Some(first) = out.manifests.origins.get(&rr) {
        out.problems.push(LoadError::Duplicate {
            file: file.to_owned(),
            doc,
            resource: rr.clone(),
            first: first.clone(),
        });
        return;
    }
    out.manifests
        .origins
        .insert(rr, format!("{}, document {doc}", file.display()));
    match r {
        Resource::Agent(a) => out.manifests.agents.push(a),
        Resource::Policy(p) => out.manifests.policies.push(p),
        Resource::Budget(b) => out.manifests.budgets.push(b),
    }
}

/// Reads one file: all of its Ringfence documents, or every problem found in it.
fn read_file(file: &Path) -> Result<Vec<(usize, Resource)>, Vec<LoadError>> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        vec![LoadError::File {
            file: file.to_owned(),
            reason: e.to_string(),
        }]
    })?;
    parse_documents(&text).map_err(|errs| {
        errs.into_iter()
            .map(|(doc, reason)| match doc {
                Some(doc) => LoadError::Document {
                    file: file.to_owned(),
                    doc,
                    reason,
                },
                None => LoadError::File {
                    file: file.to_owned(),
                    reason,
                },
            })
            .collect()
    })
}

/// A problem in a document (numbered from 1), or in the whole file (`None`).
type DocProblem = (Option<usize>, String);

/// Parses a multi-document YAML stream. Document numbers count from 1.
fn parse_documents(text: &str) -> Result<Vec<(usize, Resource)>, Vec<DocProblem>> {
    use serde::Deserialize;
    let mut out = Vec::new();
    let mut errs = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let doc = i + 1;
        let value = match serde_yaml::Value::deserialize(de) {
            Ok(v) => v,
            Err(e) => {
                // After a syntax error the stream cannot be resynchronised.
                errs.push((Some(doc), format!("not valid YAML: {e}")));
                break;
            }
        };
        if value.is_null() {
            continue;
        }
        match to_resource(value) {
            Ok(Some(r)) => out.push((doc, r)),
            Ok(None) => {}
            Err(reason) => errs.push((Some(doc), reason)),
        }
    }
    if errs.is_empty() { Ok(out) } else { Err(errs) }
}

fn to_resource(value: serde_yaml::Value) -> Result<Option<Resource>, String> {
    let field = |k: &str| value.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    let (Some(api_version), Some(kind)) = (field("apiVersion"), field("kind")) else {
        return Err("every document needs apiVersion and kind".into());
    };
    if api_version.split('/').next() != Some(GROUP) {
        return Ok(None);
    }
    if api_version != API_VERSION {
        return Err(format!(
            "apiVersion {api_version:?} is not served: use {API_VERSION}"
        ));
    }
    let resource = match kind.as_str() {
        "Agent" => Resource::Agent(typed(value, &kind)?),
        "AgentPolicy" => Resource::Policy(typed(value, &kind)?),
        "RunBudget" => Resource::Budget(typed(value, &kind)?),
        other => {
            return Err(format!(
                "kind {other:?} is not a Ringfence kind: use Agent, AgentPolicy or RunBudget"
            ));
        }
    };
    Ok(Some(resource))
}

fn typed<T: DeserializeOwned>(value: serde_yaml::Value, kind: &str) -> Result<T, String> {
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .map(str::to_owned)
        .ok_or_else(|| format!("{kind} has no metadata.name"))?;
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            format!("{kind} {name}: {}", e.inner())
        } else {
            format!("{kind} {name}: {path}: {}", e.inner())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    const AGENT: &str = "apiVersion: ringfence.dev/v1alpha1\nkind: Agent\nmetadata: {name: research}\nspec: {team: research}\n";

    #[test]
    fn reads_every_document_and_skips_other_kinds() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "a.yaml",
            &format!(
                "{AGENT}---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: x}}\n---\napiVersion: ringfence.dev/v1alpha1\nkind: RunBudget\nmetadata: {{name: b, namespace: team-a}}\nspec: {{maxDelegationDepth: 5}}\n---\n"
            ),
        );
        write(d.path(), "notes.txt", "not yaml: [");
        let loaded = Folder::new(d.path()).load();
        assert!(loaded.problems.is_empty(), "{:?}", loaded.problems);
        assert_eq!(loaded.manifests.agents.len(), 1);
        assert_eq!(
            loaded.manifests.budgets[0].spec.max_delegation_depth,
            Some(5)
        );
        assert_eq!(
            loaded.manifests.budgets[0].metadata.namespace.as_deref(),
            Some("team-a")
        );
    }

    #[test]
    fn malformed_yaml_names_the_file_and_keeps_its_last_good_content() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "agents.yaml", AGENT);
        let mut folder = Folder::new(d.path());
        assert_eq!(folder.load().manifests.agents.len(), 1);

        write(
            d.path(),
            "agents.yaml",
            "apiVersion: ringfence.dev/v1alpha1\nkind: Agent\nmetadata: {name: research\n",
        );
        let loaded = folder.load();
        let msg = loaded.problems[0].to_string();
        assert!(
            msg.contains("agents.yaml")
                && msg.contains("document 1")
                && msg.contains("not valid YAML"),
            "{msg}"
        );
        assert_eq!(loaded.manifests.agents.len(), 1, "last good content stays");
        assert_eq!(loaded.stale.len(), 1);
    }

    #[test]
    fn a_wrong_field_type_names_the_field() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "a.yaml",
            "apiVersion: ringfence.dev/v1alpha1\nkind: Agent\nmetadata: {name: research}\nspec: {appPort: eighty}\n",
        );
        let loaded = Folder::new(d.path()).load();
        let msg = loaded.problems[0].to_string();
        assert!(msg.contains("Agent research: spec.appPort"), "{msg}");
    }

    #[test]
    fn unknown_versions_and_kinds_of_our_group_are_errors() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "a.yaml",
            "apiVersion: ringfence.dev/v1\nkind: Agent\nmetadata: {name: a}\n---\napiVersion: ringfence.dev/v1alpha1\nkind: Agnet\nmetadata: {name: a}\n",
        );
        let loaded = Folder::new(d.path()).load();
        assert_eq!(loaded.problems.len(), 2, "{:?}", loaded.problems);
        assert!(
            loaded.problems[1]
                .to_string()
                .contains("\"Agnet\" is not a Ringfence kind")
        );
    }

    #[test]
    fn duplicates_keep_the_first_definition() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "a.yaml", AGENT);
        write(d.path(), "b.yaml", AGENT);
        let loaded = Folder::new(d.path()).load();
        assert_eq!(loaded.manifests.agents.len(), 1);
        assert!(matches!(loaded.problems[0], LoadError::Duplicate { .. }));
    }
}
