//! The SHA-256 of a process's executable, for rules that pin it
//! (`exe_sha256`): computed once per version of the file, on the audit
//! writer's thread, never on the event loop.

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;

/// Versions of files remembered; past this the memory starts afresh.
const MAX_FILES: usize = 1024;
/// An executable larger than this is not hashed (its rules do not match).
const MAX_EXE_BYTES: u64 = 1 << 30;

/// A version of a file: device, inode, and its modification and change
/// times (the change time cannot be set back by hand as the other can).
type FileVersion = (u64, u64, i64, i64, i64, i64);

#[derive(Debug, Default, Clone)]
pub struct ExeHashes {
    by_version: HashMap<FileVersion, String>,
}

impl ExeHashes {
    /// Lowercase hex SHA-256 of the file `pid` runs, opened through
    /// /proc/PID/exe: the very file, even if its path was replaced since.
    pub fn of_process(&mut self, pid: u32) -> Option<String> {
        let file = File::open(format!("/proc/{pid}/exe")).ok()?;
        let meta = file.metadata().ok()?;
        let version = (
            meta.dev(),
            meta.ino(),
            meta.mtime(),
            meta.mtime_nsec(),
            meta.ctime(),
            meta.ctime_nsec(),
        );
        if let Some(hash) = self.by_version.get(&version) {
            return Some(hash.clone());
        }
        if meta.len() > MAX_EXE_BYTES {
            log::warn!(
                "not hashing the executable of pid {pid}: {} bytes, more than {MAX_EXE_BYTES}",
                meta.len()
            );
            return None;
        }
        let hash = sha256_of(file)
            .map_err(|e| log::debug!("hashing the executable of pid {pid}: {e}"))
            .ok()?;
        if self.by_version.len() >= MAX_FILES {
            self.by_version.clear();
        }
        self.by_version.insert(version, hash.clone());
        Some(hash)
    }
}

fn sha256_of(mut file: File) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_the_running_executable_once() {
        let own = std::env::current_exe().expect("own exe");
        let want = sha256_of(File::open(&own).expect("open")).expect("hash");
        let mut hashes = ExeHashes::default();
        assert_eq!(hashes.of_process(std::process::id()), Some(want.clone()));
        assert_eq!(hashes.by_version.len(), 1);
        assert_eq!(hashes.of_process(std::process::id()), Some(want));
        assert_eq!(hashes.by_version.len(), 1, "the second time from memory");
        assert_eq!(hashes.of_process(u32::MAX), None);
        assert_eq!(
            sha256_of(File::open("/dev/null").expect("null")).expect("hash"),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
