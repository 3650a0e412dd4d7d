//! Reading a spec file safely: a regular file (never a FIFO that blocks
//! or a device that never ends), at most [`MAX_SPEC_BYTES`] by default,
//! UTF-8, a leading byte-order mark dropped.

use std::io::Read;
use std::path::{Path, PathBuf};

/// The largest spec read by default (`--max-spec-size` raises it): a spec
/// of 100,000 map entries is about 4 MiB.
pub const MAX_SPEC_BYTES: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read spec `{path}`")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("spec `{path}` is not a regular file ({kind}); give the path of a file")]
    NotAFile { path: PathBuf, kind: &'static str },
    #[error("spec `{path}` is larger than {max} bytes (raise the limit with `--max-spec-size`)")]
    TooLarge { path: PathBuf, max: u64 },
    #[error("spec `{path}` is not UTF-8 text (first bad byte at offset {offset})")]
    NotUtf8 { path: PathBuf, offset: usize },
}

fn kind_of(t: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a file"
    }
}

/// Reads a regular file of at most `max` bytes as text. Symlinks are
/// followed (a Kubernetes ConfigMap mounts specs through them).
pub fn read_limited(path: &Path, max: u64) -> Result<String, SourceError> {
    let io = |source| SourceError::Io { path: path.into(), source };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_file() {
        return Err(SourceError::NotAFile { path: path.into(), kind: kind_of(meta.file_type()) });
    }
    if meta.len() > max {
        return Err(SourceError::TooLarge { path: path.into(), max });
    }
    // The file may grow between the check and the read: read one byte past
    // the limit to notice.
    let file = std::fs::File::open(path).map_err(io)?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > max {
        return Err(SourceError::TooLarge { path: path.into(), max });
    }
    let mut text = String::from_utf8(bytes)
        .map_err(|e| SourceError::NotUtf8 { path: path.into(), offset: e.utf8_error().valid_up_to() })?;
    if text.starts_with('\u{feff}') {
        text.drain(..'\u{feff}'.len_utf8());
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifos_devices_directories_and_big_files_are_refused_and_a_bom_is_dropped() {
        let dir = std::env::temp_dir().join(format!("bpfsync-source-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid path; mkfifo has no other preconditions.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(matches!(read_limited(&fifo, 100), Err(SourceError::NotAFile { kind: "a FIFO", .. })));
        assert!(matches!(
            read_limited(Path::new("/dev/zero"), 100),
            Err(SourceError::NotAFile { kind: "a device", .. })
        ));
        assert!(matches!(read_limited(&dir, 100), Err(SourceError::NotAFile { kind: "a directory", .. })));
        let big = dir.join("big.yaml");
        std::fs::write(&big, "a: 1\n".repeat(100)).unwrap();
        assert!(matches!(read_limited(&big, 100), Err(SourceError::TooLarge { max: 100, .. })));
        let bom = dir.join("bom.yaml");
        std::fs::write(&bom, "\u{feff}a: 1\n").unwrap();
        assert_eq!(read_limited(&bom, 100).unwrap(), "a: 1\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
