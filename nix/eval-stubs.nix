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
  # The NixOS release to stand in for, and nix/nixos-declarations.json: an
  # option exists here only where it exists in that release, and
  # nix/eval-check.nix holds each to its real type and default.
  release,
  declarations,
}:

{ config, lib, ... }:

let
  inherit (lib) mkOption types;

  exists = path: (declarations.options.${path} or { }).${release} or null != null;

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

  # NixOS's unit names in dependency lists: a name with a unit type.
  unitNameType = types.strMatching "[a-zA-Z0-9@%:_.\\-]+[.](service|socket|device|mount|automount|swap|target|path|timer|scope|slice)";

  # NixOS checks a few [Service] values at evaluation (checkService).
  serviceConfigType = types.addCheck (types.attrsOf unitOption) (
    config:
    let
      oneOf = name: allowed: !(config ? ${name}) || lib.elem config.${name} allowed;
    in
    oneOf "Type" [
      "exec"
      "simple"
      "forking"
      "oneshot"
      "dbus"
      "notify"
      "notify-reload"
      "idle"
    ]
    && oneOf "Restart" [
      "no"
      "on-success"
      "on-failure"
      "on-abnormal"
      "on-abort"
      "on-watchdog"
      "always"
    ]
  );

  commonUnitOptions =
    lib.genAttrs [ "wantedBy" "after" "before" "bindsTo" "wants" "requires" ] (
      _:
      mkOption {
        type = types.listOf unitNameType;
        default = [ ];
      }
    )
    // {
      description = mkOption {
        type = types.singleLineStr;
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
        type = serviceConfigType;
        default = { };
      };
      reloadTriggers = mkOption {
        type = types.listOf unitOption;
        default = [ ];
      };
      restartTriggers = mkOption {
        type = types.listOf types.unspecified;
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
        type = types.attrsOf (
          types.nullOr (
            types.oneOf [
              types.str
              types.path
              types.package
            ]
          )
        );
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

  timerType = types.submodule {
    options = commonUnitOptions // {
      timerConfig = mkOption {
        type = types.attrsOf unitOption;
        default = { };
      };
    };
  };

  userType = types.submodule {
    options = {
      isSystemUser = mkOption {
        type = types.bool;
        default = false;
      };
      group = mkOption {
        type = types.str;
        default = "";
      };
      description = mkOption {
        type = types.passwdEntry types.str;
        default = "";
      };
    };
  };

  # A logrotate section: a few typed settings, the rest free-form.
  logrotateSectionType = types.submodule (
    { name, ... }:
    {
      freeformType = types.attrsOf (
        types.nullOr (
          types.oneOf [
            types.int
            types.bool
            types.str
          ]
        )
      );
      options = {
        enable = mkOption {
          type = types.bool;
          default = true;
        };
        global = mkOption {
          type = types.bool;
          default = false;
        };
        files = mkOption {
          type = types.either types.str (types.listOf types.str);
          default = name;
        };
        frequency = mkOption {
          type = types.nullOr types.str;
          default = null;
        };
        priority = mkOption {
          type = types.int;
          default = 1000;
        };
      };
    }
  );

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
          options.source = mkOption { type = types.path; };
        }
      );
      default = { };
    };
    environment.systemPackages = mkOption {
      type = types.listOf types.package;
      default = [ ];
    };

    users.users = mkOption {
      type = types.attrsOf userType;
      default = { };
    };
    users.groups = mkOption {
      type = types.attrsOf (types.submodule { });
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
    systemd.timers = mkOption {
      type = types.attrsOf timerType;
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
    }
    // lib.optionalAttrs (exists "networking.firewall.backend") {
      # As NixOS: the nftables firewall when nftables is on.
      backend = mkOption {
        type = types.enum [
          "iptables"
          "nftables"
          "firewalld"
        ];
        default = if config.networking.nftables.enable then "nftables" else "iptables";
      };
    }
    // {
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
      type = types.attrsOf logrotateSectionType;
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
      coreutils = stubPackage "coreutils";
      curl = stubPackage "curl";
      jq = stubPackage "jq";
      git = stubPackage "git";
      nodejs = stubPackage "nodejs";
    };
  };
}
