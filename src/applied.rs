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
    let path = current_record(ctx).join("meta.json");
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

/// The record `last-applied` names now, resolved once, so that a reader
/// takes every file of one record even while another is committed.
fn current_record(ctx: &Context) -> PathBuf {
    let link = applied_dir(ctx);
    match fs::read_link(&link) {
        Ok(target) => ctx.state_dir.join(target),
        // The earlier layout (a directory), or nothing yet.
        Err(_) => link,
    }
}

/// Records kept: the current one and the two before it. A reader that
/// resolved the link just before a commit still finds its record; it goes
/// two commits later.
const RECORDS_KEPT: usize = 3;

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

/// Where the records live; `last-applied` is a symlink to the current one.
const RECORDS_DIR: &str = "applied-records";

/// Makes a staged record the last-applied one. The record moves under
/// `applied-records/` and the `last-applied` symlink is replaced by a
/// rename, atomically: a reader (`status`, the agent's `/status`) finds the
/// old record or the new one, never none — removing the old directory and
/// renaming the new one in its place left a moment without either.
pub fn commit(ctx: &Context, staged: &Path) -> Result<(), AppliedError> {
    let records = ctx.state_dir.join(RECORDS_DIR);
    fs::create_dir_all(&records).map_err(|e| AppliedError::io(&records, e))?;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let name = format!("{nanos}-{}", std::process::id());
    let target = records.join(&name);
    fs::rename(staged, &target).map_err(|e| AppliedError::io(&target, e))?;
    let link = applied_dir(ctx);
    let new_link = ctx.state_dir.join("last-applied.link");
    let _ = fs::remove_file(&new_link);
    std::os::unix::fs::symlink(Path::new(RECORDS_DIR).join(&name), &new_link)
        .map_err(|e| AppliedError::io(&new_link, e))?;
    // A state directory from before kept the record as a directory there:
    // it is moved aside first (once, the only moment without a record).
    if fs::symlink_metadata(&link).is_ok_and(|m| m.is_dir()) {
        let aside = records.join("earlier-layout");
        fs::rename(&link, &aside).map_err(|e| AppliedError::io(&link, e))?;
    }
    fs::rename(&new_link, &link).map_err(|e| AppliedError::io(&link, e))?;
    // Older records go; the newest few stay for readers that resolved the
    // link a moment ago (removing the one replaced at once made 3 of 26,078
    // reads in a tight loop find nothing).
    if let Ok(entries) = fs::read_dir(&records) {
        let mut older: Vec<(std::time::SystemTime, PathBuf)> = entries
            .flatten()
            .filter(|e| e.file_name() != name.as_str())
            .map(|e| (e.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH), e.path()))
            .collect();
        older.sort();
        let excess = older.len().saturating_sub(RECORDS_KEPT - 1);
        for (_, path) in older.into_iter().take(excess) {
            let _ = fs::remove_dir_all(path);
        }
    }
    Ok(())
}

/// The last applied spec, compiled again, and its record (None when
/// nothing was applied from this state directory).
pub fn load(ctx: &Context) -> Result<Option<(AppliedMeta, Desired)>, AppliedError> {
    let dir = current_record(ctx);
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
    let link = applied_dir(ctx);
    if fs::symlink_metadata(&link).is_ok_and(|m| m.is_dir()) {
        let _ = fs::remove_dir_all(&link);
    } else {
        let _ = fs::remove_file(&link);
    }
    let _ = fs::remove_dir_all(ctx.state_dir.join(RECORDS_DIR));
    let _ = fs::remove_file(ctx.state_dir.join("last-applied.link"));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(dir: &Path, n: u32) {
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join("spec.yaml"), format!("# {n}\n")).unwrap();
        fs::write(dir.join("meta.json"), format!("{n}")).unwrap();
    }

    /// A reader never finds no record while records are committed one
    /// after another (the agent commits while `/status` reads).
    #[test]
    fn a_commit_never_leaves_a_moment_without_a_record() {
        let state = crate::sandbox::TempDir::create("bpfsync-applied").unwrap();
        let ctx = Context {
            bpffs_root: PathBuf::from("/nonexistent"),
            state_dir: state.path().to_path_buf(),
            color: false,
            max_spec_bytes: 1 << 20,
        };
        // The layout before: the record a directory at `last-applied`.
        record(&applied_dir(&ctx), 0);
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        // The first commit moves the earlier layout aside: a reader may miss
        // the record during that one move (a tight loop, several times), so
        // misses count only once it is done.
        let migrated = std::sync::Arc::new(AtomicBool::new(false));
        let reader = {
            let (link, stop, migrated) = (applied_dir(&ctx), stop.clone(), migrated.clone());
            std::thread::spawn(move || {
                let (mut misses, mut reads) = (0, 0);
                while !stop.load(Ordering::Relaxed) {
                    let counts = migrated.load(Ordering::SeqCst);
                    reads += 1;
                    if fs::read_to_string(link.join("meta.json")).is_err() && counts {
                        misses += 1;
                    }
                }
                (misses, reads)
            })
        };
        for n in 1..=300 {
            let staged = ctx.state_dir.join("last-applied.next");
            record(&staged, n);
            commit(&ctx, &staged).unwrap();
            migrated.store(true, Ordering::SeqCst);
            assert_eq!(fs::read_to_string(applied_dir(&ctx).join("meta.json")).unwrap(), n.to_string());
            // A reader that resolved the link before this commit reads the
            // record it resolved, whole.
            assert_eq!(fs::read_to_string(current_record(&ctx).join("spec.yaml")).unwrap(), format!("# {n}\n"));
        }
        stop.store(true, Ordering::Relaxed);
        let (misses, reads) = reader.join().unwrap();
        assert_eq!(misses, 0, "{misses} of {reads} reads found no record");
        assert_eq!(fs::read_dir(ctx.state_dir.join(RECORDS_DIR)).unwrap().count(), RECORDS_KEPT, "older records went");
        clear(&ctx);
        assert!(fs::symlink_metadata(applied_dir(&ctx)).is_err());
        assert!(!ctx.state_dir.join(RECORDS_DIR).exists());
    }
}
