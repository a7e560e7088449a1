//! Zero-filled files for the raft log's next segment, prepared ahead on a helper thread.
//!
//! Why zero-filled and not `fallocate`d: a write into fallocated (unwritten) blocks changes
//! the file's extent map, so every `fdatasync` of the log had to commit the ext4 journal, and
//! in ext4's default `data=ordered` mode that commit first writes out the dirty data of every
//! other file with newly allocated blocks — the history's. Under load that made one log sync
//! take over a second (the 1,000-member room bench stalled for 0.5–1.2 s). Overwriting blocks
//! that were written once is a pure data write: the sync flushes only the log's own pages.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

/// The spare's name: not a segment name, so a replay never reads it.
const SPARE_NAME: &str = "next-segment.spare";
const ZERO_CHUNK: usize = 1024 * 1024;

/// The spare segment file of one log directory.
pub struct SpareSegment {
    dir: PathBuf,
    bytes: u64,
    preparing: Option<JoinHandle<io::Result<File>>>,
}

impl SpareSegment {
    /// Spares of `bytes` each for the log in `dir`; none is prepared until asked.
    pub fn new(dir: &Path, bytes: u64) -> SpareSegment {
        SpareSegment {
            dir: dir.to_path_buf(),
            bytes,
            preparing: None,
        }
    }

    /// Starts preparing the next spare unless one is on its way.
    pub fn prepare_ahead(&mut self) {
        if self.preparing.is_some() {
            return;
        }
        let (path, bytes) = (self.dir.join(SPARE_NAME), self.bytes);
        let spawned = std::thread::Builder::new()
            .name("raft-log-spare".into())
            .spawn(move || zero_filled(&path, bytes));
        match spawned {
            Ok(handle) => self.preparing = Some(handle),
            // The segment is then zero-filled when it is needed.
            Err(e) => {
                tracing::warn!(error = %e, "cannot start preparing the next raft log segment")
            }
        }
    }

    /// A zero-filled, synced file now named `path` (which must not exist): the prepared spare,
    /// or one of `bytes` filled here if none was started or it failed.
    pub fn take(&mut self, path: &Path, bytes: u64) -> io::Result<File> {
        if path.exists() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} already exists", path.display()),
            ));
        }
        let spare = self.dir.join(SPARE_NAME);
        let prepared = match self.preparing.take().map(JoinHandle::join) {
            Some(Ok(Ok(file))) => Some(file),
            Some(Ok(Err(e))) => {
                tracing::warn!(path = %spare.display(), error = %e, "preparing the next raft log segment failed; filling it now");
                None
            }
            Some(Err(_)) | None => None,
        };
        let file = match prepared {
            Some(file) => file,
            None => zero_filled(&spare, bytes)?,
        };
        std::fs::rename(&spare, path)?;
        Ok(file)
    }
}

/// Creates (or replaces) `path` with `bytes` of zeros, on disk. On failure (a full disk) the
/// partial file is removed: it would hold space the node needs.
fn zero_filled(path: &Path, bytes: u64) -> io::Result<File> {
    let filled = fill_zeros(path, bytes);
    if filled.is_err() {
        let _ = std::fs::remove_file(path);
    }
    filled
}

fn fill_zeros(path: &Path, bytes: u64) -> io::Result<File> {
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    let zeros = vec![0u8; ZERO_CHUNK];
    let mut at = 0u64;
    while at < bytes {
        let n = (bytes - at).min(ZERO_CHUNK as u64) as usize;
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    file.sync_all()?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spare_is_zero_filled_renamed_into_place_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let mut spares = SpareSegment::new(dir.path(), 3 * ZERO_CHUNK as u64 + 5);
        // Not prepared ahead: filled on the spot.
        let first = dir.path().join("1.wal");
        let file = spares.take(&first, 3 * ZERO_CHUNK as u64 + 5).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 3 * ZERO_CHUNK as u64 + 5);
        assert!(std::fs::read(&first).unwrap().iter().all(|b| *b == 0));
        // Prepared ahead: the same, from the helper thread.
        spares.prepare_ahead();
        let second = dir.path().join("2.wal");
        spares.take(&second, 1).unwrap();
        assert_eq!(
            std::fs::metadata(&second).unwrap().len(),
            3 * ZERO_CHUNK as u64 + 5
        );
        assert!(!dir.path().join(SPARE_NAME).exists());
        // An existing segment is never replaced.
        std::fs::write(&first, b"records").unwrap();
        assert!(spares.take(&first, 1).is_err());
        assert_eq!(std::fs::read(&first).unwrap(), b"records");
    }
}
