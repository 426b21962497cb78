# The agent-egress binary. `pkgsStatic.callPackage` gives the static build.
# SPDX-License-Identifier: GPL-3.0-or-later
{
  lib,
  rustPlatform,
  linuxHeaders,
  testers,
  # More passthru.tests: the flake adds its NixOS VM tests.
  extraTests ? { },
}:

let
  manifest = (lib.importTOML ../Cargo.toml).package;
  maintainers = import ./maintainers.nix;
  package = rustPlatform.buildRustPackage {
    pname = manifest.name;
    inherit (manifest) version;

    src = lib.fileset.toSource {
      root = ../.;
      fileset = lib.fileset.unions [
        ../Cargo.toml
        ../Cargo.lock
        ../src
        # Embedded by the binary for `exec --preset`.
        ../presets
        (lib.fileset.maybeMissing ../build.rs)
        (lib.fileset.maybeMissing ../benches)
        (lib.fileset.maybeMissing ../tests)
      ];
    };

    cargoLock.lockFile = ../Cargo.lock;

    # rustables' build script runs bindgen on linux/netfilter/nf_tables.h.
    nativeBuildInputs = [ rustPlatform.bindgenHook ];
    buildInputs = [ linuxHeaders ];

    # Only unit tests: the integration tests need root, network namespaces
    # and cgroups, which the build sandbox does not have.
    cargoTestFlags = [
      "--lib"
      "--bins"
    ];

    passthru.tests = {
      version = testers.testVersion { inherit package; };
    }
    // extraTests;

    meta = {
      inherit (manifest) description;
      license = lib.licenses.gpl3Plus;
      mainProgram = "agent-egress";
      platforms = lib.platforms.linux;
      maintainers = lib.attrValues maintainers;
    };
  };
in
package
