//! Deterministic download files and their SHA-256 digests.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::process::{run, run_with_input};

/// A file nginx serves at `/big/NAME` (full speed) and `/slow/NAME` (rate-limited).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedFile {
    /// `/big/NAME`: append to `https://allowed.test` or any other host.
    pub big_path: String,
    /// `/slow/NAME`: served at 64 KiB/s, or `?rate=N` bytes/s (nginx size, e.g. `8k`).
    pub slow_path: String,
    pub size: u64,
    /// Lower-case hex SHA-256 of the contents.
    pub sha256: String,
    /// The file on disk.
    pub path: PathBuf,
}

/// Writes `size` pseudo-random bytes determined by `name` and `size` into
/// `dir/name`. Incompressible, so compression cannot hide bytes in transit.
pub fn make(dir: &Path, name: &str, size: u64) -> Result<ServedFile, String> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(format!("file name {name:?} must be a plain name"));
    }
    let path = dir.join(name);
    let file = std::fs::File::create(&path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let mut out = BufWriter::with_capacity(1 << 16, file);
    let mut state = seed(name, size);
    let mut left = size;
    while left > 0 {
        // xorshift64: fast, and the same bytes for the same name and size.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let bytes = state.to_le_bytes();
        let take = usize::try_from(left.min(8)).unwrap_or(8);
        out.write_all(&bytes[..take])
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        left -= take as u64;
    }
    out.flush()
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(ServedFile {
        big_path: format!("/big/{name}"),
        slow_path: format!("/slow/{name}"),
        size,
        sha256: sha256_file(&path)?,
        path,
    })
}

fn seed(name: &str, size: u64) -> u64 {
    // FNV-1a over the name, mixed with the size; never zero (xorshift's fixed point).
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (hash ^ size.rotate_left(32)) | 1
}

/// Lower-case hex SHA-256 of a file (coreutils `sha256sum`).
pub fn sha256_file(path: &Path) -> Result<String, String> {
    let output = run(Command::new("sha256sum").arg("--").arg(path))?;
    first_word(&output.stdout)
}

/// Lower-case hex SHA-256 of `bytes` (e.g. a curl download's stdout).
pub fn sha256_bytes(bytes: &[u8]) -> Result<String, String> {
    let output = run_with_input(&mut Command::new("sha256sum"), bytes)?;
    first_word(&output.stdout)
}

fn first_word(stdout: &[u8]) -> Result<String, String> {
    String::from_utf8_lossy(stdout)
        .split_whitespace()
        .next()
        .map(str::to_owned)
        .ok_or_else(|| "sha256sum printed nothing".to_owned())
}
