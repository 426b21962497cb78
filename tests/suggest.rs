// SPDX-License-Identifier: GPL-3.0-or-later
//! `agent-egress suggest` on a recorded audit file: golden outputs, the JSON
//! rules accepted by `check`, the Nix form evaluated with the module, and bad
//! input named and skipped.

mod cli_run;

use cli_run::run;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

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

/// nixpkgs' lib, where nix/eval-check.sh is pointed at it too.
fn nixpkgs_lib() -> Option<PathBuf> {
    let path =
        PathBuf::from(std::env::var_os("NIXPKGS_LIB").unwrap_or_else(|| "/tmp/nixlib".into()));
    let lib = path.join("lib");
    let found = lib.join("default.nix").is_file()
        && Command::new("nix-instantiate")
            .arg("--version")
            .output()
            .is_ok();
    found.then_some(lib)
}

#[test]
fn nix_form_evaluates_with_the_module() {
    let Some(lib) = nixpkgs_lib() else {
        // CI has no nixpkgs lib (nix/eval-check.sh skips there too).
        eprintln!("SKIPPED: no nixpkgs lib at $NIXPKGS_LIB or /tmp/nixlib, or no nix-instantiate");
        return;
    };
    let (code, out, err) = run(&["suggest", "--audit", FIXTURE, "--format", "nix"]);
    assert_eq!(code, 0, "{err}");
    let suggested = temp("suggested.nix");
    std::fs::write(&suggested, out).expect("write nix");
    for dir in ["package/bin", "generated", "cache"] {
        std::fs::create_dir_all(temp(dir)).expect("dir");
    }
    let eval = Command::new("nix-instantiate")
        .env("XDG_CACHE_HOME", temp("cache"))
        .env("NIX_REMOTE", "")
        .args([
            "--readonly-mode",
            "--store",
            "dummy://",
            "--eval",
            "--strict",
            "--json",
        ])
        .arg(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/suggest/eval-suggested.nix"),
        )
        .arg("--argstr")
        .arg("libPath")
        .arg(&lib)
        .arg("--argstr")
        .arg("packageDir")
        .arg(temp("package"))
        .arg("--argstr")
        .arg("generatedDir")
        .arg(temp("generated"))
        .arg("--argstr")
        .arg("suggested")
        .arg(&suggested)
        .output()
        .expect("nix-instantiate");
    assert!(
        eval.status.success(),
        "{}",
        String::from_utf8_lossy(&eval.stderr)
    );
    let result: serde_json::Value = serde_json::from_slice(&eval.stdout).expect("JSON");
    assert_eq!(
        result["failures"],
        serde_json::json!([]),
        "assertions failed"
    );
    let rules = result["settings"]["rules"].as_array().expect("rules");
    let rule = |name: &str| {
        rules
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("no rule {name} in {rules:?}"))
    };
    assert_eq!(
        rule("agent/openclaw/allow")["domains"],
        serde_json::json!([
            "=alice.github.io",
            "=api.anthropic.com",
            "=bob.github.io",
            "github.com",
            "=objects.githubusercontent.com"
        ])
    );
    assert_eq!(
        rule("agent/research-bot/allow")["domains"],
        serde_json::json!([
            "=example.com",
            "=files.pythonhosted.org",
            "huggingface.co",
            "=pypi.org"
        ])
    );
    // Addresses in a rule of their own: fields AND, one rule would match neither.
    let openclaw_ips: Vec<&serde_json::Value> = rules
        .iter()
        .filter(|r| r["name"] == "agent/openclaw/allow" && r.get("ips").is_some())
        .collect();
    assert_eq!(openclaw_ips.len(), 1, "{rules:?}");
    assert_eq!(openclaw_ips[0]["ips"], serde_json::json!(["203.0.113.9"]));
    assert!(openclaw_ips[0].get("domains").is_none(), "{rules:?}");
    // What the module generated from it is a config the daemon accepts.
    let config = temp("module-config.json");
    std::fs::write(&config, result["settings"].to_string()).expect("write");
    let (code, out, err) = run(&[
        "check",
        "--no-secret-files",
        "--config",
        config.to_str().expect("path"),
    ]);
    assert_eq!(code, 0, "{out}{err}");
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
