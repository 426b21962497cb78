# SPDX-License-Identifier: GPL-3.0-or-later
{
  description = "agent-egress: egress control for AI agents (cgroup-marked traffic, TPROXY, per-domain policy, audit)";

  inputs.nixpkgs.url = "github:nixos/nixpkgs/nixos-25.11";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f system nixpkgs.legacyPackages.${system});
    in
    {
      overlays.default = final: _prev: { agent-egress = final.callPackage ./nix/package.nix { }; };

      packages = forAllSystems (
        system: pkgs: {
          default = self.packages.${system}.agent-egress;
          agent-egress = pkgs.callPackage ./nix/package.nix {
            extraTests = {
              inherit (self.checks.${system}) module-eval vm-nftables vm-iptables;
            };
          };
          # musl, fully static: `agent-egress exec` on any Linux.
          agent-egress-static = pkgs.pkgsStatic.callPackage ./nix/package.nix { };
        }
      );

      # The module, with the package built from the system's own nixpkgs.
      nixosModules.default =
        { lib, pkgs, ... }:
        {
          imports = [ ./nix/module.nix ];
          services.agentEgress.package = lib.mkDefault (pkgs.callPackage ./nix/package.nix { });
        };

      checks = forAllSystems (
        system: pkgs:
        let
          vmTests = import ./vm-tests {
            inherit pkgs;
            module = self.nixosModules.default;
          };
          # The README's example as a whole NixOS system: evaluating its
          # toplevel checks the assertions; building module-eval builds the
          # config file, which runs `agent-egress check` on it.
          example = lib.nixosSystem {
            modules = [
              self.nixosModules.default
              ./nix/example-configuration.nix
              {
                nixpkgs.hostPlatform = system;
                boot.isContainer = true;
                system.stateVersion = "25.11";
              }
            ];
          };
        in
        {
          package = self.packages.${system}.agent-egress;
          static = self.packages.${system}.agent-egress-static;
          module-eval = builtins.seq example.config.system.build.toplevel.drvPath (
            pkgs.runCommand "agent-egress-module-eval" { } ''
              cat ${example.config.environment.etc."agent-egress/config.json".source} > $out
              echo ${lib.escapeShellArg example.config.systemd.units."agent-egress.service".text} >> $out
            ''
          );
          vm-nftables = vmTests.nftables;
          vm-iptables = vmTests.iptables;
        }
      );

      devShells = forAllSystems (
        system: pkgs: {
          default = pkgs.mkShell {
            inputsFrom = [ self.packages.${system}.agent-egress ];
            packages = [
              pkgs.clippy
              pkgs.rustfmt
              pkgs.rust-analyzer
              pkgs.nftables
              pkgs.iproute2
              pkgs.curl
              pkgs.jq
              pkgs.nixfmt-rfc-style
            ];
          };
        }
      );

      formatter = forAllSystems (_: pkgs: pkgs.nixfmt-rfc-style);
    };
}
