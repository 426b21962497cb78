// SPDX-License-Identifier: GPL-3.0-or-later
//! Running the binary on files of the repository, for the tests of the commands
//! that only read files (`suggest`, `log`): no harness, no world.

use std::process::Command;

/// Exit code, standard output and standard error of `agent-egress ARGS` run in
/// the repository's root.
pub fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_agent-egress"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("agent-egress");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
