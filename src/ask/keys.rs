// SPDX-License-Identifier: GPL-3.0-or-later
//! Answering by key in a terminal, for `watch` (on its standard input) and
//! `exec --ask` (on its /dev/tty): the terminal in single keys, and the line
//! that says what became of an answer. Which key answers what is
//! [`Answer::from_key`].

use super::Answer;
use serde_json::Value;
use std::os::fd::RawFd;

/// A terminal in single keys without echo (Ctrl-C still interrupts), as it
/// was again when dropped.
pub struct RawKeys {
    fd: RawFd,
    saved: libc::termios,
}

impl RawKeys {
    /// None when `fd` is no terminal. `fd` must stay open while this lives.
    pub fn start(fd: RawFd) -> Option<RawKeys> {
        // SAFETY: termios is plain data; tcgetattr fills it or fails.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        raw.c_lflag &= !(libc::ICANON | libc::ECHO);
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        // SAFETY: as above; ISIG stays, so Ctrl-C still interrupts.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawKeys { fd, saved })
    }
}

impl Drop for RawKeys {
    fn drop(&mut self) {
        // SAFETY: restores what tcgetattr gave, on the fd it came from.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// What became of `answer` to question `id`, from the control API's reply
/// (its status and JSON body).
pub fn said(id: u64, answer: Answer, status: u16, reply: &Value) -> String {
    if status == 200 {
        format!("question {id}: {}", answer.name())
    } else {
        format!(
            "question {id}: {status} {}",
            reply["error"].as_str().unwrap_or("refused")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_answer_taken_is_named_and_a_refused_one_says_why() {
        let taken = json!({"answered": 7, "answer": "deny-once", "held": 2});
        assert_eq!(
            said(7, Answer::DenyOnce, 200, &taken),
            "question 7: deny-once"
        );
        let gone = json!({"error": "no such pending question", "field": "id"});
        assert_eq!(
            said(7, Answer::AllowOnce, 404, &gone),
            "question 7: 404 no such pending question"
        );
        assert_eq!(
            said(8, Answer::AllowAlways, 500, &Value::Null),
            "question 8: 500 refused"
        );
    }

    #[test]
    fn what_is_no_terminal_is_left_alone() {
        let file = std::fs::File::open("/dev/null").expect("/dev/null");
        assert!(RawKeys::start(std::os::fd::AsRawFd::as_raw_fd(&file)).is_none());
    }
}
