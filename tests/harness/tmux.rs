// SPDX-License-Identifier: GPL-3.0-or-later
//! A program in a terminal, as a person would see and type at it: a detached
//! tmux session, its screen read with capture-pane, keys sent with send-keys.

use std::process::Command;

/// A detached tmux session (220 columns, 40 lines), killed when dropped.
pub struct Tmux(String);

impl Tmux {
    /// `command` is run by the shell tmux starts; when it ends, so does the
    /// session (and its screen).
    pub fn start(name: String, command: &str) -> Tmux {
        let status = Command::new("tmux")
            .args([
                "new-session",
                "-d",
                "-x",
                "220",
                "-y",
                "40",
                "-s",
                &name,
                command,
            ])
            .status()
            .expect("tmux");
        assert!(status.success(), "tmux new-session failed");
        Tmux(name)
    }

    /// The screen, with its colour escapes.
    pub fn screen(&self) -> String {
        let out = Command::new("tmux")
            .args(["capture-pane", "-p", "-e", "-t", &self.0])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Type `keys` (tmux's key names: "a", "Enter", "C-c").
    pub fn send_keys(&self, keys: &str) {
        let sent = Command::new("tmux")
            .args(["send-keys", "-t", &self.0, keys])
            .status()
            .expect("tmux send-keys");
        assert!(sent.success(), "tmux send-keys {keys} failed");
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.0])
            .status();
    }
}
