//! Proposals on disk, in the state directory:
//!
//! ```text
//! <state>/heal/proposals/<id>.json   one file per proposal, written atomically
//! <state>/heal/history.jsonl         every transition, appended (rotated at 16 MiB)
//! <state>/heal/routes.json           flap state per route (survives restarts)
//! <state>/heal/snapshot.json         the agent's view of routes and hops (for `status`)
//! <state>/heal/.lock                 flock held for each read-modify-write
//! ```
//!
//! The overlay is not a file of its own: it is the proposals whose status
//! is `applied`, in the order they were created, so it can never disagree
//! with them. The agent and the CLI (`bpfsync proposals`) share the store;
//! the lock makes their edits one at a time, not the node lock (which the
//! agent holds for life).

use std::fs;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::proposal::{BadTransition, Proposal, Status};
use crate::spec::overlay::OverlayEntry;

/// Most proposals kept; past it the oldest final ones are deleted (their
/// transitions stay in the history log).
pub const MAX_PROPOSALS: usize = 1000;
/// A proposal file larger than this is not one bpfsync wrote.
const MAX_PROPOSAL_BYTES: u64 = 1 << 20;
const MAX_HISTORY_BYTES: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot {what} `{}`", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no proposal `{0}` (see `bpfsync proposals list`)")]
    NotFound(String),
    #[error(transparent)]
    Transition(#[from] BadTransition),
    #[error("{count} proposals are pending review; no more are queued until some are decided")]
    Full { count: usize },
}

impl StoreError {
    fn io(what: &'static str, path: &Path, source: std::io::Error) -> Self {
        StoreError::Io { what, path: path.to_path_buf(), source }
    }
}

pub struct Store {
    dir: PathBuf,
}

/// The store's lock, held while it lives.
pub struct Locked<'a> {
    store: &'a Store,
    _file: fs::File,
}

/// Files that could not be read as proposals, set aside as `*.corrupt`.
#[derive(Debug, Default)]
pub struct Listing {
    pub proposals: Vec<Proposal>,
    pub set_aside: Vec<String>,
}

pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Store {
    pub fn new(state_dir: &Path) -> Store {
        Store { dir: state_dir.join("heal") }
    }

    pub fn proposals_dir(&self) -> PathBuf {
        self.dir.join("proposals")
    }

    pub fn history_path(&self) -> PathBuf {
        self.dir.join("history.jsonl")
    }

    /// The heal loop's last snapshot (routes, hops), written by the agent.
    pub fn snapshot_path(&self) -> PathBuf {
        self.dir.join("snapshot.json")
    }

    pub fn routes_path(&self) -> PathBuf {
        self.dir.join("routes.json")
    }

    /// Takes the store's lock (blocking: edits are short).
    pub fn lock(&self) -> Result<Locked<'_>, StoreError> {
        let dir = self.proposals_dir();
        fs::create_dir_all(&dir).map_err(|e| StoreError::io("create", &dir, e))?;
        let path = self.dir.join(".lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| StoreError::io("open", &path, e))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(StoreError::io("lock", &path, std::io::Error::last_os_error()));
        }
        Ok(Locked { store: self, _file: file })
    }

    /// Every proposal, oldest first, without taking the lock (files are
    /// replaced atomically). A missing store is an empty one.
    pub fn list(&self) -> Result<Listing, StoreError> {
        let dir = self.proposals_dir();
        let mut out = Listing::default();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(StoreError::io("list", &dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| StoreError::io("list", &dir, e))?;
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            match read_proposal(&path) {
                Ok(Some(p)) => out.proposals.push(p),
                Ok(None) => {} // removed meanwhile
                Err(Unreadable::Io(e)) => return Err(StoreError::io("read", &path, e)),
                Err(Unreadable::Corrupt(why)) => {
                    // Only bpfsync writes these, atomically: set it aside
                    // so it neither blocks the store nor is lost.
                    let aside = path.with_extension("json.corrupt");
                    let _ = fs::rename(&path, &aside);
                    tracing::error!(file = %path.display(), "unreadable proposal set aside: {why}");
                    out.set_aside.push(format!("{}: {why}", aside.display()));
                }
            }
        }
        out.proposals.sort_by(|a, b| (a.created_unix_ms, &a.id).cmp(&(b.created_unix_ms, &b.id)));
        Ok(out)
    }

    pub fn get(&self, id: &str) -> Result<Proposal, StoreError> {
        if !valid_id(id) {
            return Err(StoreError::NotFound(id.to_string()));
        }
        let path = self.proposals_dir().join(format!("{id}.json"));
        match read_proposal(&path) {
            Ok(Some(p)) => Ok(p),
            Ok(None) => Err(StoreError::NotFound(id.to_string())),
            Err(Unreadable::Io(e)) => Err(StoreError::io("read", &path, e)),
            Err(Unreadable::Corrupt(why)) => {
                Err(StoreError::io("read", &path, std::io::Error::new(std::io::ErrorKind::InvalidData, why)))
            }
        }
    }

    /// The overlay: applied proposals, oldest first.
    pub fn overlay(&self) -> Result<Vec<OverlayEntry>, StoreError> {
        Ok(self.list()?.proposals.iter().filter(|p| p.status == Status::Applied).map(Proposal::overlay_entry).collect())
    }
}

impl Locked<'_> {
    /// Writes a new proposal (and logs its first status). Makes room by
    /// deleting the oldest final proposals past [`MAX_PROPOSALS`].
    pub fn create(&self, p: &Proposal) -> Result<(), StoreError> {
        // Counting names is cheap; reading every proposal only when full.
        let dir = self.store.proposals_dir();
        let files = fs::read_dir(&dir)
            .map_err(|e| StoreError::io("list", &dir, e))?
            .filter(|e| e.as_ref().is_ok_and(|e| e.path().extension().is_some_and(|x| x == "json")))
            .count();
        if files >= MAX_PROPOSALS {
            let listing = self.store.list()?;
            let count = listing.proposals.len();
            // (Unreadable files were set aside by the listing: fewer may be left.)
            let excess = (count + 1).saturating_sub(MAX_PROPOSALS);
            let mut finals: Vec<&Proposal> = listing.proposals.iter().filter(|p| p.status.is_final()).collect();
            finals.truncate(excess);
            if finals.len() < excess {
                return Err(StoreError::Full { count });
            }
            for old in finals {
                let path = self.store.proposals_dir().join(format!("{}.json", old.id));
                fs::remove_file(&path).map_err(|e| StoreError::io("remove", &path, e))?;
            }
        }
        self.write(p)?;
        if let Some(t) = p.history.last() {
            self.log(&p.id, t)?;
        }
        Ok(())
    }

    /// Moves proposal `id` to `to`, logged. Returns it as it is now.
    pub fn transition(&self, id: &str, to: Status, by: &str, note: &str) -> Result<Proposal, StoreError> {
        let mut p = self.store.get(id)?;
        p.transition(to, by, now_unix_ms(), note)?;
        self.write(&p)?;
        self.log(id, p.history.last().expect("just pushed"))?;
        Ok(p)
    }

    fn write(&self, p: &Proposal) -> Result<(), StoreError> {
        let path = self.store.proposals_dir().join(format!("{}.json", p.id));
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(p).unwrap_or_default();
        fs::write(&tmp, text).map_err(|e| StoreError::io("write", &tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| StoreError::io("write", &path, e))
    }

    fn log(&self, id: &str, t: &super::proposal::Transition) -> Result<(), StoreError> {
        let path = self.store.history_path();
        if fs::metadata(&path).is_ok_and(|m| m.len() > MAX_HISTORY_BYTES) {
            let _ = fs::rename(&path, path.with_extension("jsonl.1"));
        }
        let line = serde_json::json!({
            "id": id, "status": t.status, "by": t.by, "at-unix-ms": t.at_unix_ms, "note": t.note,
        });
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| StoreError::io("append to", &path, e))?;
        writeln!(f, "{line}").map_err(|e| StoreError::io("append to", &path, e))
    }

    /// Saves a small JSON document beside the proposals (atomically).
    pub fn save_json(&self, path: &Path, value: &impl serde::Serialize) -> Result<(), StoreError> {
        let tmp = path.with_extension("tmp");
        let text = serde_json::to_vec(value).map_err(|e| StoreError::io("write", &tmp, e.into()))?;
        fs::write(&tmp, text).map_err(|e| StoreError::io("write", &tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| StoreError::io("write", path, e))
    }
}

/// Ids are `YYYYMMDD-HHMMSS-xxxx`: safe as file names, sortable.
fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// A new id from the time and what the proposal is about.
pub fn new_id(at_unix_ms: u64, about: &str) -> String {
    let secs = (at_unix_ms / 1000) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    let digest = crate::object::digest(format!("{at_unix_ms}\0{about}").as_bytes());
    format!("{y:04}{m:02}{d:02}-{:02}{:02}{:02}-{}", rem / 3600, rem % 3600 / 60, rem % 60, &digest[..4])
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian
/// (Howard Hinnant's `civil_from_days` algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + (m <= 2) as i64, m, d)
}

enum Unreadable {
    Io(std::io::Error),
    Corrupt(String),
}

fn read_proposal(path: &Path) -> Result<Option<Proposal>, Unreadable> {
    let file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Unreadable::Io(e)),
    };
    let mut text = String::new();
    file.take(MAX_PROPOSAL_BYTES + 1).read_to_string(&mut text).map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidData => Unreadable::Corrupt("not UTF-8".into()),
        _ => Unreadable::Io(e),
    })?;
    if text.len() as u64 > MAX_PROPOSAL_BYTES {
        return Err(Unreadable::Corrupt(format!("larger than {MAX_PROPOSAL_BYTES} bytes")));
    }
    serde_json::from_str(&text).map(Some).map_err(|e| Unreadable::Corrupt(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proposal(id: &str, at: u64, status: Status) -> Proposal {
        use super::super::proposal::{Action, Evidence, HopId, Transition};
        let hop = |i: &str| HopId { interface: i.into(), neighbor: "10.0.0.2".into() };
        Proposal {
            id: id.into(),
            created_unix_ms: at,
            source: "rule r".into(),
            route: "10.20.0.0/16".into(),
            action: Action::Switch { from: hop("a"), to: hop("b"), fallback_index: 0 },
            auto_apply: true,
            queued_because: None,
            evidence: Evidence {
                reason: "test".into(),
                metric: "probe-loss".into(),
                value: None,
                threshold: None,
                window_ms: 0,
                held_ms: 0,
                hops: vec![],
            },
            patch: vec![],
            diff: String::new(),
            plan: String::new(),
            status,
            history: vec![Transition { status, by: "agent".into(), at_unix_ms: at, note: String::new() }],
        }
    }

    #[test]
    fn hostile_files_in_the_store_are_set_aside_not_trusted_and_ids_cannot_escape() {
        let dir = crate::sandbox::TempDir::create("bpfsync-store-test").unwrap();
        let store = Store::new(dir.path());
        let lock = store.lock().unwrap();
        lock.create(&proposal("p1", 1, Status::Applied)).unwrap();
        let pdir = store.proposals_dir();
        fs::write(pdir.join("garbage.json"), "{ not json").unwrap();
        fs::write(pdir.join("huge.json"), vec![b' '; (MAX_PROPOSAL_BYTES + 10) as usize]).unwrap();
        fs::write(pdir.join("notes.txt"), "ignored").unwrap();
        let listing = store.list().unwrap();
        assert_eq!(listing.proposals.len(), 1);
        assert_eq!(listing.set_aside.len(), 2, "{:?}", listing.set_aside);
        assert!(pdir.join("garbage.json.corrupt").exists() && !pdir.join("garbage.json").exists());
        assert_eq!(store.overlay().unwrap().len(), 1, "only the applied, readable proposal");
        assert!(matches!(store.get("../../etc/passwd"), Err(StoreError::NotFound(_))));
        assert!(matches!(store.get("p2"), Err(StoreError::NotFound(_))));
        // A transition the lifecycle does not allow changes nothing.
        assert!(matches!(lock.transition("p1", Status::Pending, "user:x", ""), Err(StoreError::Transition(_))));
        assert_eq!(store.get("p1").unwrap().status, Status::Applied);
        let log = fs::read_to_string(store.history_path()).unwrap();
        assert_eq!(log.lines().count(), 1, "{log}");
    }

    #[test]
    fn the_store_is_bounded_and_never_drops_a_proposal_a_person_must_decide() {
        let dir = crate::sandbox::TempDir::create("bpfsync-store-test").unwrap();
        let store = Store::new(dir.path());
        let lock = store.lock().unwrap();
        lock.create(&proposal("old-final", 0, Status::Rejected)).unwrap();
        for i in 1..MAX_PROPOSALS as u64 {
            lock.create(&proposal(&format!("p{i}"), i, Status::Pending)).unwrap();
        }
        // Full: the oldest final one makes room.
        lock.create(&proposal("next", 5_000, Status::Pending)).unwrap();
        assert!(matches!(store.get("old-final"), Err(StoreError::NotFound(_))));
        // Only pending ones left: a new one is refused, none is dropped.
        assert!(matches!(lock.create(&proposal("more", 6_000, Status::Pending)), Err(StoreError::Full { .. })));
        assert_eq!(store.list().unwrap().proposals.len(), MAX_PROPOSALS);
    }

    #[test]
    fn ids_are_dates_and_safe_file_names() {
        let id = new_id(1_796_191_200_000, "10.20.0.0/16");
        assert!(id.starts_with("20261202-"), "{id}");
        assert!(valid_id(&id));
        assert!(!valid_id("../x"));
        assert!(!valid_id(""));
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }
}
