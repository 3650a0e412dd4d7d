//! The apply journal: every step's undo, written before anything runs, and
//! progress marks as steps start and finish. After a crash (`kill -9`) the
//! next apply replays the undos of every step that started, newest first.
//!
//! `journal.json` holds the steps; `journal.progress` gets one line per
//! event (`start N`, `done N`). A killed process leaves both in the page
//! cache, so no fsync per step is needed for that case; the step list is
//! synced once, before the first step.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::UndoOp;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JournalStep {
    pub what: String,
    pub undo: Vec<UndoOp>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JournalFile {
    pub format_version: u32,
    pub steps: Vec<JournalStep>,
}

/// Where a journal lives: a directory on disk, or memory for tests.
pub trait JournalStore {
    fn begin(&mut self, steps: &[JournalStep]) -> std::io::Result<()>;
    fn started(&mut self, index: usize) -> std::io::Result<()>;
    fn done(&mut self, index: usize) -> std::io::Result<()>;
    fn finish(&mut self) -> std::io::Result<()>;
    /// An unfinished journal: its steps and the highest step that started.
    fn pending(&self) -> std::io::Result<Option<(Vec<JournalStep>, Option<usize>)>>;
}

pub struct FileJournal {
    dir: PathBuf,
    progress: Option<fs::File>,
}

impl FileJournal {
    pub fn new(state_dir: &Path) -> Self {
        FileJournal { dir: state_dir.to_path_buf(), progress: None }
    }
    fn steps_path(&self) -> PathBuf {
        self.dir.join("journal.json")
    }
    fn progress_path(&self) -> PathBuf {
        self.dir.join("journal.progress")
    }
    fn mark(&mut self, line: String) -> std::io::Result<()> {
        if self.progress.is_none() {
            self.progress = Some(fs::OpenOptions::new().create(true).append(true).open(self.progress_path())?);
        }
        self.progress.as_mut().unwrap().write_all(line.as_bytes())
    }
}

impl JournalStore for FileJournal {
    fn begin(&mut self, steps: &[JournalStep]) -> std::io::Result<()> {
        fs::create_dir_all(&self.dir)?;
        let _ = fs::remove_file(self.progress_path());
        self.progress = None;
        let tmp = self.dir.join("journal.json.tmp");
        let mut f = fs::File::create(&tmp)?;
        serde_json::to_writer(&mut f, &JournalFile { format_version: 1, steps: steps.to_vec() })?;
        f.sync_all()?;
        fs::rename(tmp, self.steps_path())
    }
    fn started(&mut self, index: usize) -> std::io::Result<()> {
        self.mark(format!("start {index}\n"))
    }
    fn done(&mut self, index: usize) -> std::io::Result<()> {
        self.mark(format!("done {index}\n"))
    }
    fn finish(&mut self) -> std::io::Result<()> {
        self.progress = None;
        let _ = fs::remove_file(self.progress_path());
        match fs::remove_file(self.steps_path()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
    fn pending(&self) -> std::io::Result<Option<(Vec<JournalStep>, Option<usize>)>> {
        let text = match fs::read_to_string(self.steps_path()) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let file: JournalFile = serde_json::from_str(&text).map_err(std::io::Error::other)?;
        let progress = fs::read_to_string(self.progress_path()).unwrap_or_default();
        let started = progress
            .lines()
            .filter_map(|l| l.strip_prefix("start ").and_then(|n| n.trim().parse::<usize>().ok()))
            .max();
        Ok(Some((file.steps, started)))
    }
}

/// A journal kept in memory (tests).
#[derive(Default)]
pub struct MemJournal {
    pub steps: Option<Vec<JournalStep>>,
    pub started: Option<usize>,
}

impl JournalStore for MemJournal {
    fn begin(&mut self, steps: &[JournalStep]) -> std::io::Result<()> {
        self.steps = Some(steps.to_vec());
        self.started = None;
        Ok(())
    }
    fn started(&mut self, index: usize) -> std::io::Result<()> {
        self.started = Some(index);
        Ok(())
    }
    fn done(&mut self, _index: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn finish(&mut self) -> std::io::Result<()> {
        self.steps = None;
        self.started = None;
        Ok(())
    }
    fn pending(&self) -> std::io::Result<Option<(Vec<JournalStep>, Option<usize>)>> {
        Ok(self.steps.clone().map(|s| (s, self.started)))
    }
}
