# Stand-ins for the NixOS options and packages nix/module.nix touches, so
# that nix/eval-check.sh can evaluate the module with nixpkgs' lib alone
# (no nixpkgs, no store). Option types follow NixOS where merging matters:
# unit settings concatenate lists and refuse two different single values.
# SPDX-License-Identifier: GPL-3.0-or-later
{
  # Directory holding bin/agent-egress: the stub package's output.
  packageDir,
  # Where formats.json.generate "writes": eval-check.sh puts the JSON there.
  generatedDir,
}:

{ config, lib, ... }:

let
  inherit (lib) mkOption types;

  stubPackage = name: {
    type = "derivation";
    inherit name;
    outPath = "/nix/store/eval-stub-${name}";
  };

  # NixOS's systemd unit setting: a list if any definition is one.
  unitOption = lib.mkOptionType {
    name = "systemd option";
    merge =
      loc: defs:
      let
        defs' = lib.filterOverrides defs;
      in
      if lib.any (def: lib.isList def.value) defs' then
        lib.concatMap (def: lib.toList def.value) defs'
      else
        lib.mergeEqualOption loc defs';
  };

  commonUnitOptions =
    lib.genAttrs [ "wantedBy" "after" "before" "bindsTo" "wants" "requires" ] (
      _:
      mkOption {
        type = types.listOf types.str;
        default = [ ];
      }
    )
    // {
      description = mkOption {
        type = types.str;
        default = "";
      };
      unitConfig = mkOption {
        type = types.attrsOf unitOption;
        default = { };
      };
    };

  serviceType = types.submodule {
    options = commonUnitOptions // {
      serviceConfig = mkOption {
        type = types.attrsOf unitOption;
        default = { };
      };
      reloadTriggers = mkOption {
        type = types.listOf unitOption;
        default = [ ];
      };
      restartTriggers = mkOption {
        type = types.listOf unitOption;
        default = [ ];
      };
      stopIfChanged = mkOption {
        type = types.bool;
        default = true;
      };
      path = mkOption {
        type = types.listOf (types.either types.package types.str);
        default = [ ];
      };
      environment = mkOption {
        type = types.attrsOf types.str;
        default = { };
      };
      script = mkOption {
        type = types.lines;
        default = "";
      };
    };
  };

  sliceType = types.submodule {
    options = commonUnitOptions // {
      sliceConfig = mkOption {
        type = types.attrsOf unitOption;
        default = { };
      };
    };
  };

  freeformAttrs = types.attrsOf (types.submodule { freeformType = types.attrsOf types.anything; });

  jsonValue = types.nullOr (
    types.oneOf [
      types.bool
      types.int
      types.float
      types.str
      types.path
      (types.attrsOf jsonValue)
      (types.listOf jsonValue)
    ]
  );
in
{
  options = {
    assertions = mkOption {
      type = types.listOf types.unspecified;
      default = [ ];
    };
    warnings = mkOption {
      type = types.listOf types.str;
      default = [ ];
    };

    environment.etc = mkOption {
      type = types.attrsOf (
        types.submodule {
          options.source = mkOption { type = types.unspecified; };
        }
      );
      default = { };
    };
    environment.systemPackages = mkOption {
      type = types.listOf types.package;
      default = [ ];
    };

    users.users = mkOption {
      type = freeformAttrs;
      default = { };
    };
    users.groups = mkOption {
      type = freeformAttrs;
      default = { };
    };

    systemd.package = mkOption {
      type = types.package;
      default = stubPackage "systemd";
    };
    systemd.services = mkOption {
      type = types.attrsOf serviceType;
      default = { };
    };
    systemd.slices = mkOption {
      type = types.attrsOf sliceType;
      default = { };
    };

    networking.enableIPv6 = mkOption {
      type = types.bool;
      default = true;
    };
    networking.nftables.enable = mkOption {
      type = types.bool;
      default = false;
    };
    networking.firewall = {
      enable = mkOption {
        type = types.bool;
        default = true;
      };
      # As NixOS: the nftables firewall when nftables is on.
      backend = mkOption {
        type = types.enum [
          "iptables"
          "nftables"
        ];
        default = if config.networking.nftables.enable then "nftables" else "iptables";
      };
      extraReversePathFilterRules = mkOption {
        type = types.lines;
        default = "";
      };
      extraCommands = mkOption {
        type = types.lines;
        default = "";
      };
    };

    services.resolved.enable = mkOption {
      type = types.bool;
      default = false;
    };
    services.logrotate.settings = mkOption {
      type = types.attrsOf (types.attrsOf types.anything);
      default = { };
    };
  };

  config = {
    _module.args.pkgs = {
      formats.json =
        { }:
        {
          type = jsonValue;
          generate = name: _value: "${generatedDir}/${name}";
        };
      runCommand = name: env: buildCommand: {
        type = "derivation";
        inherit name env buildCommand;
        outPath = "${generatedDir}/${name}.out";
      };
      writeShellScript = name: text: {
        type = "derivation";
        inherit name text;
        outPath = "${generatedDir}/${name}";
      };
      agent-egress = {
        type = "derivation";
        name = "agent-egress";
        outPath = packageDir;
        meta.mainProgram = "agent-egress";
      };
      # What the flake's module builds its package with.
      callPackage = path: _args: {
        type = "derivation";
        name = "callPackage ${baseNameOf path}";
        outPath = packageDir;
        meta.mainProgram = "agent-egress";
      };
      # A native build: the build machine runs what it builds.
      stdenv = {
        buildPlatform.canExecute = _platform: true;
        hostPlatform = { };
      };
      bash = stubPackage "bash";
      coreutils = stubPackage "coreutils";
      nftables = stubPackage "nftables";
      git = stubPackage "git";
      nodejs = stubPackage "nodejs";
    };
  };
}
