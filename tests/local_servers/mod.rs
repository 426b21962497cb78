//! Real servers from Debian (dnsmasq, microsocks, tinyproxy, danted) run on
//! loopback for the length of one test.

use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A server process, killed and reaped when the test ends, however it ends.
pub struct Server {
    child: Child,
    name: String,
}

impl Server {
    /// Starts `cmd`; its output goes to `log` so a failing test can show it.
    pub fn spawn(mut cmd: Command, log: &Path) -> Server {
        let name = cmd.get_program().to_string_lossy().into_owned();
        let out = std::fs::File::create(log).unwrap();
        let err = out.try_clone().unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Server { child, name }
    }

    /// Waits until `ready` holds; panics naming the server (and whether it
    /// died) otherwise.
    pub fn wait_until(&mut self, mut ready: impl FnMut() -> bool) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if ready() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited before it was ready: {status}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("{} not ready after 10 s", self.name);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where `tool` is installed. Missing: a failure under CI, else a loud skip.
pub fn tool(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/usr/bin"].map(PathBuf::from));
    let found = dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{name} is not installed (apt-get install it)"
        );
        eprintln!("SKIPPED: {name} is not installed");
    }
    found
}

/// A loopback port free for both TCP and UDP right now.
pub fn free_port() -> u16 {
    loop {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A fresh directory for one test's config files and logs, removed after.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(test: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("agent-egress-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
