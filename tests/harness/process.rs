//! Running helper commands and owning long-lived child processes.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a guarded child gets to exit after SIGTERM before it is SIGKILLed.
pub const STOP_GRACE: Duration = Duration::from_secs(3);
/// The tail of a child's log printed when a test panics.
const LOG_TAIL_BYTES: u64 = 4096;

/// A one-line rendering of a command for error messages.
pub fn describe(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// Runs `cmd` to completion; an error names the command, its status and its stderr.
pub fn run(cmd: &mut Command) -> Result<Output, String> {
    run_with_input(cmd, &[])
}

/// Runs `cmd` with `input` on its stdin; errors as for [`run`].
pub fn run_with_input(cmd: &mut Command, input: &[u8]) -> Result<Output, String> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run `{}`: {e}", describe(cmd)))?;
    let stdin = child.stdin.take();
    // Feed stdin from another thread: a large input and output would otherwise fill
    // both pipes and deadlock.
    let output = std::thread::scope(|scope| {
        let writer = scope.spawn(move || stdin.map(|mut pipe| pipe.write_all(input)));
        let output = child.wait_with_output();
        let fed = writer
            .join()
            .map_err(|_| "stdin writer panicked".to_owned())?;
        if let Some(Err(e)) = fed {
            return Err(format!("cannot feed `{}`: {e}", describe(cmd)));
        }
        output.map_err(|e| format!("cannot wait for `{}`: {e}", describe(cmd)))
    })?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(format!(
            "`{}` failed ({}): {}",
            describe(cmd),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// A running child process that is stopped (SIGTERM, then SIGKILL) and reaped on
/// drop. Its stdout and stderr go to a log file; when the dropping thread is
/// panicking, the log's tail is printed so a failing test shows what the child said.
pub struct ChildGuard {
    child: Child,
    name: String,
    log: PathBuf,
}

impl ChildGuard {
    /// Spawns `cmd` with stdin closed and stdout+stderr appended to `log`.
    pub fn spawn(mut cmd: Command, name: &str, log: &Path) -> Result<ChildGuard, String> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("cannot open log {}: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("cannot clone log {}: {e}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {name} (`{}`): {e}", describe(&cmd)))?;
        Ok(ChildGuard {
            child,
            name: name.to_owned(),
            log: log.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the child has written so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `Some(status)` once the child has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends SIGTERM and waits up to `grace` for the child to exit, then SIGKILLs it.
    /// Returns the exit status and whether it exited within the grace period.
    pub fn stop(mut self, grace: Duration) -> (ExitStatus, bool) {
        self.terminate(grace).unwrap_or_else(|e| panic!("{e}"))
    }

    fn terminate(&mut self, grace: Duration) -> Result<(ExitStatus, bool), String> {
        if let Some(status) = self.try_wait() {
            return Ok((status, true));
        }
        signal(self.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.try_wait() {
                return Ok((status, true));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // Child::kill sends SIGKILL; wait reaps it so no zombie outlives the guard.
        let _ = self.child.kill();
        let status = self
            .child
            .wait()
            .map_err(|e| format!("cannot reap {} (pid {}): {e}", self.name, self.child.id()))?;
        Ok((status, false))
    }

    fn log_tail(&self) -> String {
        let Ok(mut file) = File::open(&self.log) else {
            return String::new();
        };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)));
        let mut tail = Vec::new();
        let _ = file.read_to_end(&mut tail);
        String::from_utf8_lossy(&tail).into_owned()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // No panic here: a second panic during a failing test's unwinding aborts.
        let outcome = match self.terminate(STOP_GRACE) {
            Ok((status, _)) => status.to_string(),
            Err(e) => e,
        };
        if std::thread::panicking() {
            eprintln!(
                "---- {} (pid {}, {outcome}) log {} (tail) ----\n{}",
                self.name,
                self.child.id(),
                self.log.display(),
                self.log_tail()
            );
        }
    }
}

/// Sends `sig` to `pid`, ignoring a process that is already gone.
pub fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}
