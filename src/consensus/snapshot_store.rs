//! The node's current Raft snapshot, on disk: `snapshot.json` in the data directory.
//!
//! A snapshot is the chat *state* only (sessions, names, rooms, dedup windows, settings), never
//! the history, so its size follows the live state. The file is one header line (the format
//! and the snapshot's meta) followed by the state as JSON; it is written through a `BufWriter`
//! and read through a `BufReader`, so neither building nor installing holds the encoded bytes
//! in memory, and it is sent to a follower as a stream of the same bytes.
//!
//! Rules that keep a node startable:
//! - the meta travels inside the file, so whoever opens the file gets the meta and the state of
//!   one snapshot (an open file handle survives a later rename over it);
//! - every write takes one lock and replaces the file only with a *newer* snapshot, so a slow
//!   local build can never overwrite a newer snapshot installed from the leader;
//! - files are written under a unique temporary name, fsynced, renamed, and the directory
//!   fsynced.

use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use super::types::SnapshotMeta;
use crate::chat::state::ChatState;

/// The current snapshot's file in the data directory.
pub const SNAPSHOT_FILE: &str = "snapshot.json";

const FORMAT: u32 = 2;
/// A header line longer than this is not a snapshot header.
const MAX_HEADER: u64 = 1024 * 1024;

#[derive(Serialize, Deserialize)]
struct Header {
    format: u32,
    meta: SnapshotMeta,
}

/// The file layout before format 2: one JSON object with the meta and the state.
#[derive(Deserialize)]
struct LegacyFile {
    meta: SnapshotMeta,
    state: ChatState,
}

/// A readable snapshot file: what openraft hands to the network and to `install_snapshot`.
#[derive(Debug)]
pub struct SnapshotBlob {
    pub file: File,
    /// A file received from the leader, to be moved into place when installed.
    pub incoming: Option<PathBuf>,
}

pub struct SnapshotStore {
    dir: PathBuf,
    path: PathBuf,
    /// The meta of `snapshot.json`; held while the file is replaced.
    current: Mutex<Option<SnapshotMeta>>,
}

fn index_of(meta: &SnapshotMeta) -> u64 {
    meta.last_log_id.as_ref().map_or(0, |l| l.index)
}

fn invalid(path: &Path, what: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("snapshot {} is corrupt: {what}", path.display()),
    )
}

/// Reads the header line of a snapshot file (the file is left just after it).
fn read_header(reader: &mut BufReader<&File>, path: &Path) -> io::Result<Result<Header, String>> {
    let mut line = Vec::new();
    reader.take(MAX_HEADER).read_until(b'\n', &mut line)?;
    Ok(serde_json::from_slice::<Header>(&line)
        .map_err(|e| e.to_string())
        .and_then(|h| {
            if h.format == FORMAT {
                Ok(h)
            } else {
                Err(format!(
                    "unknown snapshot format {} in {}",
                    h.format,
                    path.display()
                ))
            }
        }))
}

impl SnapshotStore {
    /// Opens the store in `dir` and reads the current snapshot, if there is one. Leftover
    /// temporary files from an interrupted write are removed.
    pub fn open(dir: &Path) -> io::Result<(SnapshotStore, Option<(SnapshotMeta, ChatState)>)> {
        for entry in std::fs::read_dir(dir)? {
            let name = entry?.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("snapshot.") && name.ends_with(".tmp") {
                let _ = std::fs::remove_file(dir.join(name.as_ref()));
            }
        }
        let path = dir.join(SNAPSHOT_FILE);
        let restored = match File::open(&path) {
            Ok(file) => Some(read_file(&file, &path)?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let store = SnapshotStore {
            dir: dir.to_path_buf(),
            path,
            current: Mutex::new(restored.as_ref().map(|(m, _)| m.clone())),
        };
        Ok((store, restored))
    }

    fn lock(&self) -> MutexGuard<'_, Option<SnapshotMeta>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The meta of the current snapshot.
    pub fn current_meta(&self) -> Option<SnapshotMeta> {
        self.lock().clone()
    }

    /// A unique path in the data directory for a snapshot being received.
    pub fn incoming_path(&self) -> PathBuf {
        self.dir
            .join(format!("snapshot.{}.tmp", uuid::Uuid::new_v4().simple()))
    }

    /// Writes `state` with its `meta` to a new temporary file (fsynced) and returns its path.
    pub fn write_temporary(&self, meta: &SnapshotMeta, state: &ChatState) -> io::Result<PathBuf> {
        let tmp = self.incoming_path();
        let written = (|| {
            let file = File::create(&tmp)?;
            let mut out = BufWriter::with_capacity(256 * 1024, &file);
            let header = Header {
                format: FORMAT,
                meta: meta.clone(),
            };
            serde_json::to_writer(&mut out, &header).map_err(io::Error::other)?;
            out.write_all(b"\n")?;
            serde_json::to_writer(&mut out, state).map_err(io::Error::other)?;
            out.flush()?;
            drop(out);
            file.sync_all()
        })();
        match written {
            Ok(()) => Ok(tmp),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// Makes a temporary snapshot file current. Returns false (and removes the file) when the
    /// current snapshot is as new or newer.
    pub fn commit_temporary(&self, meta: &SnapshotMeta, tmp: &Path) -> io::Result<bool> {
        let mut current = self.lock();
        if current
            .as_ref()
            .is_some_and(|c| index_of(c) >= index_of(meta))
        {
            let _ = std::fs::remove_file(tmp);
            return Ok(false);
        }
        self.replace_with(tmp)?;
        *current = Some(meta.clone());
        Ok(true)
    }

    /// Moves a received, already read snapshot into place, unless the current one is as new.
    pub fn commit_incoming(&self, meta: &SnapshotMeta, blob: &SnapshotBlob) -> io::Result<()> {
        let Some(tmp) = &blob.incoming else {
            return Ok(());
        };
        let mut current = self.lock();
        if current
            .as_ref()
            .is_some_and(|c| index_of(c) >= index_of(meta))
        {
            let _ = std::fs::remove_file(tmp);
            return Ok(());
        }
        blob.file.sync_all()?;
        self.replace_with(tmp)?;
        *current = Some(meta.clone());
        Ok(())
    }

    fn replace_with(&self, tmp: &Path) -> io::Result<()> {
        std::fs::rename(tmp, &self.path)?;
        File::open(&self.dir)?.sync_all()
    }

    /// The current snapshot as an open file: its meta is read from that same file.
    pub fn current(&self) -> io::Result<Option<(SnapshotMeta, SnapshotBlob)>> {
        // The lock keeps a replacement from landing between the check and the open.
        let current = self.lock();
        if current.is_none() {
            return Ok(None);
        }
        let file = File::open(&self.path)?;
        drop(current);
        let meta = {
            let mut reader = BufReader::new(&file);
            read_header(&mut reader, &self.path)?
                .map_err(|e| invalid(&self.path, e))?
                .meta
        };
        (&file).rewind()?;
        Ok(Some((
            meta,
            SnapshotBlob {
                file,
                incoming: None,
            },
        )))
    }
}

/// Reads a whole snapshot file: its meta and its state.
pub fn read_file(file: &File, path: &Path) -> io::Result<(SnapshotMeta, ChatState)> {
    let mut start = file;
    start.rewind()?;
    let mut reader = BufReader::with_capacity(256 * 1024, file);
    match read_header(&mut reader, path)? {
        Ok(header) => {
            let state: ChatState =
                serde_json::from_reader(&mut reader).map_err(|e| invalid(path, e))?;
            Ok((header.meta, state))
        }
        Err(_) => {
            // Perhaps a file from before format 2.
            let mut f = file;
            f.rewind()?;
            let legacy: LegacyFile =
                serde_json::from_reader(BufReader::new(f)).map_err(|e| invalid(path, e))?;
            Ok((legacy.meta, legacy.state))
        }
    }
}

/// Reads only the meta of a snapshot file.
pub fn read_meta(file: &File, path: &Path) -> io::Result<SnapshotMeta> {
    let mut start = file;
    start.rewind()?;
    let mut reader = BufReader::new(file);
    let meta = match read_header(&mut reader, path)? {
        Ok(header) => header.meta,
        Err(_) => read_file(file, path)?.0,
    };
    let mut f = file;
    f.rewind()?;
    Ok(meta)
}

/// Reads a snapshot received from a peer (from its start).
pub fn read_blob(blob: &SnapshotBlob) -> io::Result<(SnapshotMeta, ChatState)> {
    let path = blob
        .incoming
        .clone()
        .unwrap_or_else(|| PathBuf::from("(received snapshot)"));
    (&blob.file).rewind()?;
    read_file(&blob.file, &path)
}
