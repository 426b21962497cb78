// SPDX-License-Identifier: GPL-3.0-or-later
//! What the packaging promises about itself: the Rust toolchain the locked tree needs,
//! the nixpkgs release the flake pins and the facts recorded about it, and the README's
//! NixOS example being the file the checks evaluate.

use std::fs;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    fs::read_to_string(root().join(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

fn json(relative: &str) -> Value {
    serde_json::from_str(&read(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

/// "1.88" or "1.88.0" as (1, 88, 0).
fn version(text: &str) -> (u64, u64, u64) {
    let mut parts = text.split('.').map(|part| {
        part.parse::<u64>()
            .unwrap_or_else(|e| panic!("version {text:?}: {e}"))
    });
    let mut next = || parts.next().unwrap_or(0);
    (next(), next(), next())
}

/// The release flake.lock pins, as nix/nixos-declarations.json records it.
fn pinned_release() -> (String, Value) {
    let declarations = json("nix/nixos-declarations.json");
    let releases = declarations["releases"]
        .as_object()
        .expect("nix/nixos-declarations.json: releases is an object");
    let mut pinned = releases
        .iter()
        .filter(|(_, release)| release["role"] == "pinned");
    let (name, release) = pinned
        .next()
        .expect("nix/nixos-declarations.json: no release has role \"pinned\"");
    assert!(
        pinned.next().is_none(),
        "nix/nixos-declarations.json: more than one pinned release"
    );
    (name.clone(), release.clone())
}

/// `rust-version` is what the locked tree needs on this platform: the highest
/// `rust_version` of the packages cargo would build, no lower (the build would fail
/// on an older rustc with a confusing error) and no higher (it would refuse a rustc
/// that works).
#[test]
fn rust_version_is_the_minimum_of_the_locked_tree() {
    let platform = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    let output = Command::new(env!("CARGO"))
        .args(["metadata", "--locked", "--format-version", "1"])
        .args(["--filter-platform", &platform])
        .arg("--manifest-path")
        .arg(root().join("Cargo.toml"))
        .output()
        .expect("run cargo metadata");
    assert!(
        output.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: Value = serde_json::from_slice(&output.stdout).expect("cargo metadata JSON");
    // Only what the resolve reaches on this platform, dev-dependencies included (the
    // Nix package runs the unit tests).
    let resolved: Vec<&str> = metadata["resolve"]["nodes"]
        .as_array()
        .expect("resolve.nodes")
        .iter()
        .filter_map(|node| node["id"].as_str())
        .collect();
    let (needed, by) = metadata["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .filter(|package| {
            package["id"]
                .as_str()
                .is_some_and(|id| resolved.contains(&id))
        })
        .filter(|package| package["name"] != env!("CARGO_PKG_NAME"))
        .filter_map(|package| {
            let needs = package["rust_version"].as_str()?;
            Some((version(needs), package["name"].as_str()?.to_string()))
        })
        .max()
        .expect("some locked package states its rust_version");
    let declared = version(env!("CARGO_PKG_RUST_VERSION"));
    assert_eq!(
        declared,
        needed,
        "Cargo.toml's rust-version is {}, the locked tree needs {}.{}.{} ({by})",
        env!("CARGO_PKG_RUST_VERSION"),
        needed.0,
        needed.1,
        needed.2
    );

    let (name, release) = pinned_release();
    let shipped = release["rustc"]
        .as_str()
        .unwrap_or_else(|| panic!("release {name}: no rustc recorded"));
    assert!(
        version(shipped) >= declared,
        "nixos {name} ships rustc {shipped}, older than rust-version {}",
        env!("CARGO_PKG_RUST_VERSION")
    );
}

/// flake.lock pins the release whose declarations the stubs are held to.
#[test]
fn flake_lock_pins_the_release_the_facts_describe() {
    let (name, release) = pinned_release();
    let lock = json("flake.lock");
    let node = &lock["nodes"]["nixpkgs"];
    assert_eq!(
        node["locked"]["rev"], release["rev"],
        "flake.lock's nixpkgs rev is not the pinned release {name} of nix/nixos-declarations.json"
    );
    assert_eq!(node["locked"]["narHash"], release["narHash"]);
    assert_eq!(node["original"]["ref"], release["branch"]);
    let flake = read("flake.nix");
    let input = format!(
        "github:nixos/nixpkgs/{}",
        release["branch"].as_str().unwrap()
    );
    assert!(
        flake.contains(&input),
        "flake.nix's nixpkgs input is not {input}"
    );
    let readme = read("README.md");
    assert!(
        readme.contains(&input),
        "the README's flake example does not follow {input}"
    );
}

/// The README says its configuration.nix block is nix/example-configuration.nix, which
/// the checks evaluate: hold it to that, apart from the file's header comment.
#[test]
fn readme_configuration_block_is_the_evaluated_example() {
    let readme = read("README.md");
    let marker = "This is `nix/example-configuration.nix`";
    let after = &readme[readme
        .find(marker)
        .unwrap_or_else(|| panic!("README lacks {marker:?}"))..];
    let start = after
        .find("```nix\n")
        .expect("a ```nix block after the marker")
        + 7;
    let block = &after[start..];
    let block = &block[..block.find("```").expect("the block's end")];
    let example = read("nix/example-configuration.nix");
    let body: String = example
        .lines()
        .skip_while(|line| line.starts_with('#'))
        .map(|line| format!("{line}\n"))
        .collect();
    assert_eq!(
        block.trim_end(),
        body.trim_end(),
        "README's configuration.nix differs from nix/example-configuration.nix"
    );
}

/// nix/eval-check.sh needs nixpkgs' lib, which CI cannot fetch: when every check
/// passes it stamps the hashes of the files it evaluated (the module, the stubs, the
/// facts of the real declarations, the VM install set). A change to any of them since
/// fails here until the evaluation has passed on it again.
#[test]
fn evaluation_stamp_covers_the_current_nix_files() {
    let stamp = json("nix/eval-stamp.json");
    let stamped = stamp["inputs"]
        .as_object()
        .expect("nix/eval-stamp.json: inputs is an object");
    let current = stamped_files();
    let mut stale = Vec::new();
    for relative in &current {
        let output = Command::new("sha256sum")
            .arg(root().join(relative))
            .output()
            .expect("run sha256sum");
        let text = String::from_utf8_lossy(&output.stdout);
        let hash = text.split_whitespace().next().unwrap_or_default();
        match stamped.get(relative).and_then(Value::as_str) {
            Some(recorded) if recorded == hash => {}
            Some(_) => stale.push(format!("{relative} changed")),
            None => stale.push(format!("{relative} is new")),
        }
    }
    for name in stamped.keys() {
        if !current.contains(name) {
            stale.push(format!("{name} is gone"));
        }
    }
    assert!(
        stale.is_empty(),
        "since nix/eval-check.sh last passed: {}; run EVAL_CHECK_UPDATE=1 nix/eval-check.sh LIB_PATH \
         (LIB_PATH: a nixpkgs.lib checkout) and commit what it rewrites",
        stale.join(", ")
    );
}

/// The files nix/eval-check.sh stamps: those of nix/, presets/ and vm-tests/ (not
/// below), the VM install set, and suggest's golden Nix output (evaluated with
/// the module there).
fn stamped_files() -> Vec<String> {
    let mut files = vec![
        "vm-tests/systemd/install.json".to_string(),
        "tests/fixtures/suggest/suggested.nix".to_string(),
    ];
    for dir in ["nix", "presets", "vm-tests"] {
        let entries = fs::read_dir(root().join(dir)).unwrap_or_else(|e| panic!("{dir}: {e}"));
        for entry in entries {
            let entry = entry.expect("directory entry");
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.path().is_file() && name != "eval-stamp.json" {
                files.push(format!("{dir}/{name}"));
            }
        }
    }
    files.sort();
    files
}
