//! What was applied, kept in the state directory: the last applied spec
//! (with copies of the objects it named, so it compiles later whatever
//! happened to the originals) and its record (absolute path, digest,
//! time). `status` diffs the kernel against it; the agent stages a record
//! when a spec loads and commits it once the spec is applied.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::compile::Desired;
use crate::spec::LoadedSpec;

/// Where bpfsync keeps its pins and its records.
#[derive(Debug, Clone)]
pub struct Context {
    pub bpffs_root: PathBuf,
    pub state_dir: PathBuf,
    pub color: bool,
    /// The largest spec (and snapshot) read, in bytes.
    pub max_spec_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AppliedError {
    #[error("cannot write or read `{path}` in the state directory")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{path}` is damaged: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error(transparent)]
    Source(#[from] crate::spec::SourceError),
    #[error("the last applied spec no longer compiles")]
    NoLongerCompiles(#[source] Box<crate::spec::Diagnostics>),
}

impl AppliedError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        AppliedError::Io { path: path.to_path_buf(), source }
    }
}

/// What `status` compares against: the last spec applied, with copies of
/// the objects it named.
#[derive(Debug, Serialize, Deserialize)]
pub struct AppliedMeta {
    pub spec_path: String,
    pub spec_sha256: String,
    pub applied_at_unix: u64,
    /// The overlay entries merged onto the file (proposal id and why).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overlay: Vec<crate::spec::overlay::EntryNote>,
}

/// The last-applied record's metadata alone (None when nothing was
/// applied from this state directory).
pub fn load_meta(ctx: &Context) -> Result<Option<AppliedMeta>, AppliedError> {
    let path = applied_dir(ctx).join("meta.json");
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(AppliedError::io(&path, e)),
    };
    serde_json::from_str(&text).map(Some).map_err(|e| AppliedError::Corrupt { path, message: e.to_string() })
}

fn applied_dir(ctx: &Context) -> PathBuf {
    ctx.state_dir.join("last-applied")
}

/// Records `loaded` (and the objects it names) as the last applied spec.
pub fn save(ctx: &Context, loaded: &LoadedSpec, desired: &Desired) -> Result<(), AppliedError> {
    let staged = stage(ctx, loaded, desired, "last-applied.tmp")?;
    commit(ctx, &staged)
}

/// Makes the last-applied record as `name` in the state directory, to be
/// committed once the apply succeeds (the agent stages when a spec loads,
/// so it need not keep the parsed spec in memory).
pub fn stage(ctx: &Context, loaded: &LoadedSpec, desired: &Desired, name: &str) -> Result<PathBuf, AppliedError> {
    let tmp = ctx.state_dir.join(name);
    let _ = fs::remove_dir_all(&tmp);
    let io = |p: &Path, e| AppliedError::io(p, e);
    fs::create_dir_all(tmp.join("objects")).map_err(|e| io(&tmp, e))?;
    let mut spec = loaded.spec.clone();
    for p in &mut spec.programs {
        if p.object.is_some()
            && let Some(bytes) = desired.objects.get(&p.name)
        {
            let name = format!("{}.bpf.o", p.name);
            let path = tmp.join("objects").join(&name);
            fs::write(&path, bytes).map_err(|e| io(&path, e))?;
            p.object = Some(format!("objects/{name}"));
        }
    }
    let text = format!(
        "# The spec bpfsync last applied (from `{}`); object paths point at copies.\n{}",
        loaded.file.display(),
        serde_yaml::to_string(&spec)
            .map_err(|e| AppliedError::Corrupt { path: tmp.clone(), message: e.to_string() })?
    );
    fs::write(tmp.join("spec.yaml"), text).map_err(|e| io(&tmp, e))?;
    // Absolute, so `status` finds the file from any directory.
    let spec_path = fs::canonicalize(&loaded.file).or_else(|_| std::path::absolute(&loaded.file));
    let meta = AppliedMeta {
        spec_path: spec_path.as_deref().unwrap_or(&loaded.file).display().to_string(),
        spec_sha256: crate::object::digest(loaded.source.as_bytes()),
        applied_at_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        overlay: loaded
            .overlay
            .applied
            .iter()
            .map(|e| crate::spec::overlay::EntryNote { id: e.id.clone(), reason: e.reason.clone() })
            .collect(),
    };
    let meta = serde_json::to_string_pretty(&meta).unwrap_or_default();
    fs::write(tmp.join("meta.json"), meta).map_err(|e| io(&tmp, e))?;
    Ok(tmp)
}

/// Makes a staged record the last-applied one.
pub fn commit(ctx: &Context, staged: &Path) -> Result<(), AppliedError> {
    let dir = applied_dir(ctx);
    let _ = fs::remove_dir_all(&dir);
    fs::rename(staged, &dir).map_err(|e| AppliedError::io(&dir, e))
}

/// The last applied spec, compiled again, and its record (None when
/// nothing was applied from this state directory).
pub fn load(ctx: &Context) -> Result<Option<(AppliedMeta, Desired)>, AppliedError> {
    let dir = applied_dir(ctx);
    let spec_path = dir.join("spec.yaml");
    if !spec_path.exists() {
        return Ok(None);
    }
    let meta_path = dir.join("meta.json");
    let text = fs::read_to_string(&meta_path).map_err(|e| AppliedError::io(&meta_path, e))?;
    let meta: AppliedMeta =
        serde_json::from_str(&text).map_err(|e| AppliedError::Corrupt { path: meta_path, message: e.to_string() })?;
    let source = crate::spec::read_limited(&spec_path, ctx.max_spec_bytes)?;
    let (_, desired) =
        crate::compile::load_and_compile(&spec_path, &source, &[], &mut crate::compile::ObjectLoader::default())
            .map_err(|d| AppliedError::NoLongerCompiles(Box::new(d)))?;
    Ok(Some((meta, desired)))
}

/// Forgets what was applied (after `down`).
pub fn clear(ctx: &Context) {
    let _ = fs::remove_dir_all(applied_dir(ctx));
}
