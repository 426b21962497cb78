//! The names of everything one world creates, all derived from one random id, so
//! worlds in parallel tests (and parallel test binaries) never collide and
//! leftovers are recognisable.

use std::io::Read;
use std::path::PathBuf;

/// Every world's cgroup directory and temp dir is `ae-test-<id>`.
pub const DIR_PREFIX: &str = "ae-test-";
/// Length of a world id: hex digits.
pub const ID_LEN: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// 8 lower-case hex digits.
    pub id: String,
}

impl Names {
    /// A fresh random id (the caller claims it by creating [`Names::temp_dir`]).
    pub fn random() -> Result<Names, String> {
        let mut bytes = [0u8; ID_LEN / 2];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut bytes))
            .map_err(|e| format!("cannot read /dev/urandom: {e}"))?;
        let id = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Ok(Names { id })
    }

    /// The agent host's netns: `ae<id>a` (11 characters).
    pub fn agent_ns(&self) -> String {
        format!("ae{}a", self.id)
    }

    /// The internet's netns: `ae<id>n`.
    pub fn net_ns(&self) -> String {
        format!("ae{}n", self.id)
    }

    /// `ae-test-<id>`: the temp dir's name and the parent cgroup's.
    pub fn dir_name(&self) -> String {
        format!("{DIR_PREFIX}{}", self.id)
    }

    pub fn temp_dir(&self) -> PathBuf {
        std::env::temp_dir().join(self.dir_name())
    }

    /// `<temp dir>/owner`: the pid of the process that built the world.
    pub fn owner_file(&self) -> PathBuf {
        self.temp_dir().join("owner")
    }

    /// `/etc/netns/<ns>`: files `ip netns exec` bind-mounts over `/etc`.
    pub fn etc_netns(ns: &str) -> PathBuf {
        PathBuf::from("/etc/netns").join(ns)
    }
}

/// The world id in a netns name made by [`Names`], if it is one.
pub fn id_of_netns(name: &str) -> Option<&str> {
    let id = name.strip_prefix("ae")?;
    let id = id.strip_suffix('a').or_else(|| id.strip_suffix('n'))?;
    is_id(id).then_some(id)
}

/// The world id in an `ae-test-<id>` directory name, if it is one.
pub fn id_of_dir(name: &str) -> Option<&str> {
    let id = name.strip_prefix(DIR_PREFIX)?;
    is_id(id).then_some(id)
}

fn is_id(s: &str) -> bool {
    s.len() == ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}
