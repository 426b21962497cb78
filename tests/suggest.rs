// SPDX-License-Identifier: GPL-3.0-or-later
//! `agent-egress suggest` on a recorded audit file: golden outputs, the JSON
//! rules accepted by `check`, and bad input named and skipped. The golden Nix
//! output is evaluated with the module by nix/eval-check.sh, whose stamp
//! (tests/packaging.rs) covers it.

mod cli_run;

use cli_run::run;

use std::io::Write;
use std::path::{Path, PathBuf};

const FIXTURE: &str = "tests/fixtures/suggest/audit.jsonl";

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ae-suggest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join(name)
}

/// Compares with the golden file; `UPDATE_GOLDEN=1` rewrites it instead.
fn golden(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/suggest")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).expect("write golden");
        return;
    }
    let expected = std::fs::read_to_string(&path).expect("golden file");
    assert_eq!(
        actual, expected,
        "{name} differs (UPDATE_GOLDEN=1 rewrites it)"
    );
}

#[test]
fn json_is_golden_and_names_the_bad_lines() {
    let (code, out, err) = run(&["suggest", "--audit", FIXTURE]);
    assert_eq!(code, 0, "{err}");
    golden("suggested.json", &out);
    for want in [
        "audit.jsonl:18: not an audit record: expected ident",
        "audit.jsonl:19: not an audit record: missing field `verdict`",
        "25 record(s) read, 21 used, 4 not about an allowlist; 2 bad line(s), 0 unreadable file(s)",
        "the daemon lost 3 record(s) (audit_drops)",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
}

#[test]
fn nix_is_golden() {
    let (code, out, err) = run(&["suggest", "--audit", FIXTURE, "--format", "nix"]);
    assert_eq!(code, 0, "{err}");
    golden("suggested.nix", &out);
}

#[test]
fn agent_and_min_count_narrow_it() {
    let (code, out, err) = run(&[
        "suggest",
        "--audit",
        FIXTURE,
        "--agent",
        "openclaw",
        "--min-count",
        "2",
    ]);
    assert_eq!(code, 0, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let domains: Vec<&str> = json["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .flat_map(|r| r["domains"].as_array().into_iter().flatten())
        .filter_map(|d| d.as_str())
        .collect();
    assert_eq!(domains, ["github.com", "=api.anthropic.com"]);
    let left_out: Vec<&str> = json["left_out"]
        .as_array()
        .expect("left_out")
        .iter()
        .filter_map(|e| e["pattern"].as_str())
        .collect();
    assert_eq!(
        left_out,
        [
            "203.0.113.9",
            "=alice.github.io",
            "=bob.github.io",
            "=objects.githubusercontent.com"
        ]
    );
}

#[test]
fn check_accepts_the_json_rules() {
    let (code, out, err) = run(&["suggest", "--audit", FIXTURE]);
    assert_eq!(code, 0, "{err}");
    let suggested: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let rules = suggested["rules"].clone();
    let mut cgroups: Vec<String> = rules
        .as_array()
        .expect("rules")
        .iter()
        .flat_map(|r| r["agents"].as_array().into_iter().flatten())
        .filter_map(|a| a.as_str().map(String::from))
        .collect();
    cgroups.dedup();
    let config = serde_json::json!({"interception": {"cgroups": cgroups}, "rules": rules});
    let path = temp("config.json");
    std::fs::write(&path, config.to_string()).expect("write config");
    let (code, out, err) = run(&["check", "--config", path.to_str().expect("path")]);
    assert_eq!(code, 0, "check refused the suggestion:\n{out}{err}");
    // And the policy gives the learnt rule for a learnt name, the default for a refused one.
    let explain = |target: &str| {
        let (_, out, _) = run(&[
            "explain",
            "--config",
            path.to_str().expect("path"),
            "--agent",
            &cgroups[0],
            target,
        ]);
        out
    };
    assert!(explain("codeload.github.com:22").contains("suggest/openclaw/22,443"));
    assert!(explain("evil.example").contains("default"));
}

#[test]
fn gzip_and_missing_files_and_nothing_usable() {
    let plain =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join(FIXTURE)).expect("fixture");
    let gz = temp("audit.jsonl.1.gz");
    let mut encoder = flate2::write::GzEncoder::new(
        std::fs::File::create(&gz).expect("create"),
        flate2::Compression::default(),
    );
    encoder.write_all(&plain).expect("gzip");
    encoder.finish().expect("gzip");
    let (_, from_plain, _) = run(&["suggest", "--audit", FIXTURE]);
    let missing = temp("no-such.jsonl");
    let (code, from_gz, err) = run(&[
        "suggest",
        "--audit",
        gz.to_str().expect("path"),
        missing.to_str().expect("path"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(from_gz, from_plain);
    assert!(
        err.contains("no-such.jsonl: No such file or directory"),
        "{err}"
    );
    assert!(
        err.contains("audit.jsonl.1.gz:18: not an audit record"),
        "{err}"
    );

    let junk = temp("junk.jsonl");
    std::fs::write(&junk, "{\"ts\": 1}\nnot json\n").expect("write");
    let (code, _, err) = run(&[
        "suggest",
        "--audit",
        junk.to_str().expect("path"),
        missing.to_str().expect("path"),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("junk.jsonl:1: not an audit record: invalid type"),
        "{err}"
    );
    assert!(err.contains("nothing usable was read"), "{err}");
}
