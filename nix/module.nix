# NixOS module for agent-egress: the daemon, its JSON config, the slice the
# agents live in, and the wiring of the agents' units.
#
# No meta.maintainers here: NixOS's option admits only members of
# lib.maintainers (modules/generic/meta-maintainers.nix checks each), which
# this project is not; nix/package.nix names its maintainers.
# SPDX-License-Identifier: GPL-3.0-or-later
{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib)
    mkOption
    mkIf
    mkMerge
    mkOrder
    mkDefault
    types
    literalExpression
    ;

  cfg = config.services.agentEgress;
  settings = cfg.settings;
  format = pkgs.formats.json { };

  daemonUnit = "agent-egress.service";
  builtinOutbounds = [
    "direct"
    "block"
  ];

  # presets/*.json, the same files the binary embeds for `exec --preset`.
  presets = lib.mapAttrs' (
    file: _:
    lib.nameValuePair (lib.removeSuffix ".json" file) (lib.importJSON (../presets + "/${file}"))
  ) (lib.filterAttrs (file: kind: kind == "regular" && lib.hasSuffix ".json" file) (builtins.readDir ../presets));

  # systemd nests slices by the dashes in their names: a-b-c.slice lives in
  # a.slice/a-b.slice/a-b-c.slice below the cgroup2 root.
  sliceCgroupPath =
    slice:
    let
      parts = lib.splitString "-" (lib.removeSuffix ".slice" slice);
      prefixes = lib.genList (i: lib.concatStringsSep "-" (lib.take (i + 1) parts)) (lib.length parts);
    in
    lib.concatMapStringsSep "/" (prefix: "${prefix}.slice") prefixes;

  # An agent's name becomes one component of its slice's name, where a dash
  # would mean one more level of nesting; systemd-escape spells it \x2d.
  agentSliceName =
    name: "${lib.removeSuffix ".slice" cfg.slice}-${lib.replaceStrings [ "-" ] [ "\\x2d" ] name}.slice";

  unitName = unit: lib.removeSuffix ".service" unit;
  isTemplate = unit: lib.hasSuffix "@" (unitName unit);

  agents = lib.mapAttrs (name: agent: rec {
    inherit (agent)
      slice
      units
      allow
      block
      allowBus
      rules
      ;
    cgroup = sliceCgroupPath slice;
    # A template's instances get cgroups whose names are not known here; the
    # agent's slice covers them.
    cgroups = [ cgroup ] ++ map (unit: "${cgroup}/${unitName unit}.service") (
      lib.filter (unit: !isTemplate unit) units
    );
    outbound = if agent.outbound == null then cfg.outbound else agent.outbound;
  }) cfg.agents;

  unknownLists = names: lib.filter (list: !(cfg.lists ? ${list})) names;
  listDomains = names: lib.concatMap (list: cfg.lists.${list}.domains or [ ]) names;

  # The match fields of an allow or block list, without the empty ones the
  # daemon refuses ("an empty list matches nothing").
  matchFields =
    policy:
    lib.filterAttrs (_: values: values != [ ]) {
      domains = lib.unique (policy.domains ++ listDomains policy.lists);
      inherit (policy) ips;
    };

  # A rule's fields AND: one with both domains and ips would match only a
  # connection with a name of the list to an address of the list. Names and
  # addresses get a rule each, under the same name.
  rule =
    name: outbound: policy: extra:
    let
      fields = matchFields policy;
    in
    map (field: {
      inherit name outbound;
      ${field} = fields.${field};
    } // extra) (lib.attrNames fields);

  agentRules =
    order: f: mkOrder order (lib.concatLists (lib.mapAttrsToList (name: agent: f name agent) agents));

  generatedRules = [
    (mkOrder 500 (
      lib.optional cfg.blockCloudMetadata {
        name = "metadata";
        ips = [
          "169.254.0.0/16"
          "fd00:ec2::254/128"
        ];
        outbound = "block";
        # No runtime rule (services.agentEgress.control) may open it.
        locked = true;
      }
    ))
    (mkOrder 1100 (rule "block" "block" cfg.block { }))
    (agentRules 1200 (
      name: agent: rule "agent/${name}/block" "block" agent.block { agents = agent.cgroups; }
    ))
    # An agent's own rules (by process, say): after both block lists, before the allow lists.
    (agentRules 1250 (
      name: agent:
      lib.imap0 (
        i: r: { name = "agent/${name}/rules[${toString i}]"; } // r // { agents = agent.cgroups; }
      ) agent.rules
    ))
    (agentRules 1300 (
      name: agent: rule "agent/${name}/allow" agent.outbound agent.allow { agents = agent.cgroups; }
    ))
    # An agent with its own outbound takes it for the shared allow list too.
    (agentRules 1400 (
      name: agent:
      lib.optionals (agent.outbound != cfg.outbound) (
        rule "agent/${name}/shared-allow" agent.outbound cfg.allow { agents = agent.cgroups; }
      )
    ))
    (mkOrder 1500 (rule "allow" cfg.outbound cfg.allow { }))
  ];

  nftSet = "cgroup:inet:${settings.interception.table}:agents";

  # Lists, so that a unit's own NFTSet= or RestrictNetworkInterfaces= adds to ours.
  captureConfig = {
    NFTSet = [ nftSet ];
  }
  // lib.optionalAttrs (cfg.agentInterfaces != null) {
    RestrictNetworkInterfaces = cfg.agentInterfaces;
  };

  # Unix sockets that lead out of an agent's cgroup: systemd and D-Bus start
  # transient units outside it, container engines start containers outside
  # it (%U: the unit's user, for its own runtime directory).
  busSockets = [
    "-/run/dbus/system_bus_socket"
    "-/run/systemd/private"
    "-/run/user/%U/bus"
    "-/run/user/%U/systemd/private"
  ];
  engineSockets = [
    "-/run/docker.sock"
    "-/var/run/docker.sock"
    "-/run/containerd/containerd.sock"
    "-/run/podman/podman.sock"
    "-/run/user/%U/docker.sock"
    "-/run/user/%U/podman/podman.sock"
  ];
  # Name services that resolve outside the agents' cgroup: nscd (nsncd) and
  # systemd-resolved's varlink API (nss-resolve). Hidden, glibc falls back to
  # its own files and dns, whose queries the daemon's DNS handler answers.
  resolverSockets = [
    "-/run/nscd/socket"
    "-/run/systemd/resolve/io.systemd.Resolve"
  ];
  hiddenSockets =
    agent: engineSockets ++ resolverSockets ++ lib.optionals (!agent.allowBus) busSockets;

  loopbackServer =
    server: builtins.match "(127\\.[0-9.]+(:[0-9]+)?|::1|[[]::1[]](:[0-9]+)?)" server != null;

  # networking.firewall.backend arrived after 25.05 (with firewalld); before
  # it the nftables firewall ran exactly when networking.nftables was on.
  firewallBackend =
    config.networking.firewall.backend
      or (if config.networking.nftables.enable then "nftables" else "iptables");

  auditFile = settings.audit.path != "-";
  auditInLogsDirectory = lib.hasPrefix "/var/log/agent-egress/" settings.audit.path;

  configFile =
    let
      unchecked = format.generate "agent-egress.json" settings;
    in
    if cfg.checkConfig then
      pkgs.runCommand "agent-egress-checked.json" { } ''
        # Secrets (password_file) are not in the build sandbox: their paths are checked.
        ${lib.getExe cfg.package} check --no-secret-files --config ${unchecked}
        cp ${unchecked} "$out"
      ''
    else
      unchecked;

  # The settings the daemon reads only at start, as one value: a switch that
  # changes them restarts the daemon, any other change reloads it.
  restartOnly = builtins.hashString "sha256" (
    builtins.toJSON {
      listen = settings.listen or { };
      audit = settings.audit or { };
      control = settings.control or { };
      state_dir = settings.state_dir or null;
      interception = lib.filterAttrs (
        name: _:
        lib.elem name [
          "table"
          "mark"
          "route_table"
          "manage_kernel"
        ]
      ) settings.interception;
    }
  );

  # Run after the daemon says it is ready (Type=notify: table, routes, BPF
  # programs and listeners in place), with full privileges ("+"): it makes a
  # probe cgroup below each agent cgroup, which the daemon's sandbox may not.
  # A failed self-test fails the start, and the agents bound to it stay down.
  doctorCommand = "${lib.getExe cfg.package} doctor --config /etc/agent-egress/config.json";
  doctor = "+${doctorCommand}";
  doctorTimer = cfg.doctorInterval != null && settings.interception.manage_kernel;

  # The confinement the module's own services share; each adds what it needs
  # (address families, system calls, capabilities, directories).
  sandbox = {
    ProtectSystem = "strict";
    ProtectHome = true;
    PrivateTmp = true;
    PrivateDevices = true;
    # DAC_READ_SEARCH reads any file; keep the secrets out of view.
    InaccessiblePaths = [
      "-/etc/shadow"
      "-/etc/gshadow"
      "-/etc/ssh"
      "-/run/keys"
      "-/run/secrets"
    ];
    # Other services' state, out of view too: an empty /var/lib. A unit with
    # a state directory binds its own into it (`stateBind`): under an
    # inaccessible /var/lib it could not be reached at all (the systemd VM
    # test's learn_suggests found that).
    TemporaryFileSystem = "/var/lib:ro";
    # The daemon only reads cgroups (inotify and stat): read-only is enough.
    ProtectControlGroups = true;
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectClock = true;
    ProtectHostname = true;
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    LockPersonality = true;
    MemoryDenyWriteExecute = true;
    RemoveIPC = true;
    SystemCallArchitectures = "native";
    SystemCallErrorNumber = "EPERM";
  };

  controlSocket = "/run/agent-egress/control.sock";

  # What `sandbox` takes away besides from the units that need no privilege
  # at all (learn, the supervisors): the network, capabilities, other
  # processes, the privileged system calls.
  unprivileged = {
    PrivateNetwork = true;
    CapabilityBoundingSet = "";
    NoNewPrivileges = true;
    ProtectProc = "invisible";
    ProcSubset = "pid";
    SystemCallFilter = [
      "@system-service"
      "~@privileged"
    ];
  };

  # What a unit with StateDirectory = "agent-egress" adds to `sandbox`.
  stateBind = {
    StateDirectory = "agent-egress";
    StateDirectoryMode = "0700";
    BindPaths = [ "/var/lib/agent-egress" ];
  };

  # learn: `suggest` over the audit file and its rotated copies, written to
  # the state directory through a temporary file and a rename, so a reader
  # never sees half a file.
  suggestedFile = "/var/lib/agent-egress/suggested.nix";
  learnScript = ''
    shopt -s nullglob
    tmp=$(mktemp ${suggestedFile}.XXXXXX)
    trap 'rm -f "$tmp"' EXIT
    agent-egress suggest --format nix --audit ${lib.escapeShellArg settings.audit.path}* >"$tmp"
    mv "$tmp" ${suggestedFile}
  '';

  # /proc/PID/fd of an agent's processes (another user's) is mode 0500 and
  # its links need ptrace access: attribution needs both capabilities.
  capabilities = [
    "CAP_NET_ADMIN" # nftables, policy routing, IP_TRANSPARENT, SO_MARK, cgroup BPF attach
    "CAP_BPF" # load the connect log (which pid connected; src/connect_log.rs) and its map
    "CAP_SYS_PTRACE" # readlink /proc/PID/fd/* and /proc/PID/exe of agents
    "CAP_DAC_READ_SEARCH" # list /proc/PID/fd of agents running as other users
    "CAP_NET_RAW" # answer the agents' DNS from the address they asked (a raw UDP socket)
  ];

  policyOption =
    verb: description:
    mkOption {
      inherit description;
      default = { };
      type = types.submodule {
        options = {
          domains = mkOption {
            type = types.listOf types.str;
            default = [ ];
            example = [
              "example.com"
              "=exact.example.org"
              "*.cdn.example.net"
            ];
            description = ''
              Domain patterns to ${verb}: `example.com` is that name and its
              subdomains, `=example.com` that name only, `*.example.com` its
              subdomains only. Names are compared after normalisation (case,
              trailing dot, IDN).
            '';
          };
          lists = mkOption {
            type = types.listOf types.str;
            default = [ ];
            example = [
              "crates"
              "github"
            ];
            description = ''
              Names of entries of {option}`services.agentEgress.lists` (the
              presets included) whose domains to ${verb}.
            '';
          };
          ips = mkOption {
            type = types.listOf types.str;
            default = [ ];
            example = [ "192.0.2.0/24" ];
            description = ''
              Addresses or CIDRs to ${verb}. A connection to an IP literal
              with no name in it is matched only by these.
            '';
          };
        };
      };
    };

  # A JSON object whose listed keys are typed, the others free.
  jsonObject =
    options:
    types.submodule {
      freeformType = format.type;
      inherit options;
    };

  freeformSection =
    description: options:
    mkOption {
      type = jsonObject options;
      default = { };
      inherit description;
    };
in
{
  options.services.agentEgress = {
    enable = lib.mkEnableOption "agent-egress, egress control for the network traffic of AI agents";

    package = lib.mkPackageOption pkgs "agent-egress" { };

    checkConfig = mkOption {
      type = types.bool;
      default = pkgs.stdenv.buildPlatform.canExecute pkgs.stdenv.hostPlatform;
      defaultText = literalExpression "pkgs.stdenv.buildPlatform.canExecute pkgs.stdenv.hostPlatform";
      description = ''
        Check the generated configuration at build time with the package's
        own `agent-egress check`, so that a bad configuration fails the
        build with the daemon's error message. Off by default where the
        build machine cannot run the package (cross-compiling).
      '';
    };

    settings = mkOption {
      default = { };
      description = ''
        The daemon's JSON configuration (see the README for every key).
        Anything the daemon accepts may be set here; the common parts have
        typed options. `rules` holds, in this order: the cloud metadata
        block, the rules given here, then the rules generated from the
        shared block list, each agent's block list, each agent's allow list
        and the shared allow list. The first rule that matches decides.
      '';
      type = jsonObject {
        listen = freeformSection "Where the proxy listens for captured connections." {
          port = mkOption {
            type = types.port;
            default = 15001;
            description = "Port of the TPROXY listener.";
          };
          addresses = mkOption {
            type = types.listOf types.str;
            default = [ "127.0.0.1" ] ++ lib.optional config.networking.enableIPv6 "::1";
            defaultText = literalExpression ''[ "127.0.0.1" ] ++ lib.optional config.networking.enableIPv6 "::1"'';
            description = "Loopback addresses of the TPROXY listener.";
          };
        };

        interception = freeformSection "How agents' traffic is captured." {
          manage_kernel = mkOption {
            type = types.bool;
            default = true;
            description = ''
              Let the daemon install and keep its nftables table and policy
              routing. Off is "proxy only": the table named below, with a
              set `agents` of cgroup ids, must then come from elsewhere.
            '';
          };
          cgroups = mkOption {
            type = types.listOf types.str;
            default = [ ];
            description = ''
              Cgroups (relative to the cgroup2 root) whose sockets are
              captured. The agents' slice and each agent's slice and units
              are added by the module; add others here.
            '';
          };
          table = mkOption {
            type = types.strMatching "[A-Za-z0-9_]{1,64}";
            default = "agent_egress";
            description = "Name of the daemon's `inet` nftables table.";
          };
          mark = mkOption {
            type = types.ints.between 1 4294967295;
            default = 2785;
            description = "Firewall mark of captured packets (2785 = 0xae1).";
          };
          backstop = mkOption {
            type = types.either types.bool (types.enum [ "auto" ]);
            default = false;
            description = ''
              The daemon's own kernel backstop (a BPF program on each agent
              cgroup letting packets out through `lo` only). Off here: systemd
              attaches the same on the agents' units and slices
              ({option}`services.agentEgress.agentInterfaces`), and the
              daemon's sandbox lacks CAP_SYS_ADMIN, without which it cannot
              tell systemd's programs from copies of its own.
            '';
          };
        };

        dns = freeformSection "The resolvers the daemon uses." {
          servers = mkOption {
            type = types.listOf types.str;
            default = lib.optional config.services.resolved.enable "127.0.0.53";
            defaultText = literalExpression ''lib.optional config.services.resolved.enable "127.0.0.53"'';
            description = ''
              Resolvers (IP or IP:port) the daemon queries, and the only
              ones the agents may send DNS to. Agents whose interfaces are
              restricted to loopback reach only a resolver on loopback:
              systemd-resolved's stub (127.0.0.53, the default when
              {option}`services.resolved.enable` is set) or a local
              dnsmasq or unbound.
            '';
          };
        };

        outbounds = mkOption {
          type = types.attrsOf (jsonObject {
            type = mkOption {
              type = types.enum [
                "direct"
                "block"
                "socks5"
                "http"
              ];
              description = "Kind of egress.";
            };
          });
          default = { };
          example = literalExpression ''
            {
              tor = { type = "socks5"; server = "127.0.0.1:9050"; };
              wan2 = { type = "direct"; interface = "wg0"; mark = 100; };
              corp = {
                type = "http";
                server = "10.0.0.8:3128";
                username = "agents";
                # with systemd.services.agent-egress.serviceConfig.LoadCredential =
                #   [ "corp-proxy:/run/secrets/corp-proxy" ];
                password_file = "/run/credentials/agent-egress.service/corp-proxy";
              };
            }
          '';
          description = ''
            Named egresses besides the built-in `direct` and `block`.
            A `password` given here ends up in the Nix store, readable by
            every local user: use `password_file` (read at start and at every
            reload), for example a systemd credential (`LoadCredential=`).
          '';
        };

        rules = mkOption {
          type = types.listOf (jsonObject {
            outbound = mkOption {
              type = types.str;
              description = "Name of the outbound a matching connection takes.";
            };
          });
          default = [ ];
          description = ''
            Ordered rules, first match wins; each has `name`, `domains`,
            `ips`, `ports` and `agents`, and on the connecting process
            `process`, `comm`, `user`, `ancestor`, `cgroup` and `exe_sha256`
            (fields AND, values within a field OR) and names an `outbound`.
          '';
        };

        default = mkOption {
          type = types.str;
          default = "block";
          description = "Outbound of connections no rule matches.";
        };

        audit = freeformSection "The audit log: one JSON line per connection." {
          path = mkOption {
            type = types.str;
            default = "/var/log/agent-egress/audit.jsonl";
            description = ''
              File the records are appended to, or `-` for standard output
              (the journal). The file is reopened on reload, and by itself
              within a second of being rotated away (renamed or removed).
              The daemon cannot see /var/lib: keep the file elsewhere.
            '';
          };
        };

        mode = mkOption {
          type = types.enum [
            "enforce"
            "audit"
          ];
          default = "enforce";
          description = ''
            `audit` lets everything out direct and records what `enforce`
            would have done.
          '';
        };

        limits = freeformSection "Bounds on the daemon's resources." {
          connections = mkOption {
            type = types.ints.between 1 1000000;
            default = 8192;
            description = "Most connections relayed at once.";
          };
        };
      };
    };

    slice = mkOption {
      type = types.strMatching "[A-Za-z0-9_]+(-[A-Za-z0-9_]+)*\\.slice";
      default = "agent-egress-agents.slice";
      description = ''
        The slice every agent lives in: all its members are captured, and
        `systemd-run --slice=` puts an ad-hoc command under control. Each
        agent gets a slice of its own below it.
      '';
    };

    doctorInterval = mkOption {
      type = types.nullOr types.str;
      default = "15min";
      example = "1h";
      description = ''
        How often `agent-egress doctor` tests the running daemon (a systemd
        time span; it also runs at every start, as `ExecStartPost`). A
        failed run fails `agent-egress-doctor.service`, which shows in
        `systemctl --failed`. `null`: only at start.
      '';
    };

    learn = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Learn an allowlist: the daemon runs in audit mode (`settings.mode =
        "audit"`: everything is let through and recorded), and every hour
        `agent-egress-learn.service` runs `agent-egress suggest --format nix`
        on the audit file and its rotated copies and writes
        ${suggestedFile}: per agent, the allow lists that would let through
        what it did, ready for `services.agentEgress.agents`. Review it, put
        it in your configuration, and turn learn off to enforce. Needs the
        audit records in a file (`settings.audit.path`) in the JSON format.
      '';
    };

    agentInterfaces = mkOption {
      type = types.nullOr (types.listOf types.str);
      default = [ "lo" ];
      description = ''
        `RestrictNetworkInterfaces=` of the agents' slices and units: a
        kernel backstop that holds even with the nftables table gone and the
        daemon frozen, since captured traffic leaves through `lo`. `null`
        turns the backstop off (needed for bypassed destinations on other
        interfaces).
      '';
    };

    outbound = mkOption {
      type = types.str;
      default = "direct";
      description = "Outbound of the traffic {option}`services.agentEgress.allow` lets through.";
    };

    allow = policyOption "allow" "What every agent may reach.";

    block = policyOption "block" ''
      What no agent may reach. Block lists are matched before allow lists,
      so a block here also wins over an agent's own allow list.
    '';

    control = {
      enable = mkOption {
        type = types.bool;
        default = false;
        description = ''
          The control API: HTTP/1.1 + JSON on the Unix socket
          /run/agent-egress/control.sock (mode 0660, group
          {option}`services.agentEgress.control.group`), for a supervisor (a
          person, a script, an AI agent) to see live connections and events
          and to add runtime rules, kept in /var/lib/agent-egress. Rules the
          config marks `locked` (the metadata block) cannot be widened by them.
        '';
      };
      group = mkOption {
        type = types.strMatching "[A-Za-z0-9_][A-Za-z0-9_.-]*";
        default = "agent-egress-control";
        description = ''
          The group whose members may use the control socket (created). Keep
          the agents' users out of it: a member can change their policy.
        '';
      };
      supervisors = mkOption {
        type = types.attrsOf (
          types.submodule {
            options = {
              script = mkOption {
                type = types.lines;
                description = ''
                  The supervisor, as a shell script: it reaches the control API
                  on the socket named by `$AGENT_EGRESS_CONTROL` (with
                  `curl --unix-socket`, or `agent-egress mcp --socket`), to
                  answer the `ask` verdict's questions, watch the events or
                  change runtime rules. It should keep going when the daemon
                  restarts (a failed request: wait and ask again); the unit
                  restarts it when it exits. nix/example-configuration.nix has
                  one that answers by a list of hosts.
                '';
              };
              path = mkOption {
                type = types.listOf types.package;
                default = [ ];
                example = literalExpression "[ pkgs.curl pkgs.jq ]";
                description = "Packages on the script's PATH (besides agent-egress and coreutils).";
              };
            };
          }
        );
        default = { };
        example = literalExpression ''
          {
            by-list = {
              path = [ pkgs.curl pkgs.jq ];
              script = builtins.readFile ./by-list-supervisor.sh;
            };
          }
        '';
        description = ''
          Supervisors: each a unit `agent-egress-supervisor-NAME` running its
          script as a user of its own (DynamicUser) in
          {option}`services.agentEgress.control.group`, with no network but
          Unix sockets, no capabilities, and the daemon's sandbox. Needs
          {option}`services.agentEgress.control.enable`.
        '';
      };
    };

    blockCloudMetadata = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Block link-local addresses (169.254.0.0/16, where cloud metadata
        services answer, and AWS's fd00:ec2::254) before any other rule.
      '';
    };

    lists = mkOption {
      type = types.attrsOf (
        types.submodule {
          options = {
            description = mkOption {
              type = types.str;
              default = "";
              description = "What the list is for.";
            };
            domains = mkOption {
              type = types.listOf types.str;
              description = "Domain patterns.";
            };
          };
        }
      );
      default = { };
      example = literalExpression ''
        {
          internal = { description = "Our forge and CI"; domains = [ "git.example.com" "ci.example.com" ]; };
        }
      '';
      description = ''
        Named domain lists that allow and block lists refer to. The presets
        (${lib.concatStringsSep ", " (lib.attrNames presets)}) are defined
        here from presets/*.json; defining one again replaces its domains.
      '';
    };

    agents = mkOption {
      type = types.attrsOf (
        types.submodule (
          { name, ... }:
          {
            options = {
              units = mkOption {
                type = types.listOf types.str;
                default = [ ];
                example = [
                  "openclaw"
                  "codex-worker@"
                ];
                description = ''
                  systemd services (defined elsewhere) that run this agent. Each
                  is moved into the agent's slice, joins the nftables set,
                  is bound to the daemon (stopped with it, started after it)
                  and restricted to {option}`services.agentEgress.agentInterfaces`.
                  A name ending in `@` is a template: all its instances.
                '';
              };
              allow = policyOption "allow" "What this agent may reach besides the shared allow list.";
              block = policyOption "block" "What this agent may not reach even if the shared allow list has it.";
              rules = mkOption {
                type = types.listOf (jsonObject {
                  outbound = mkOption {
                    type = types.str;
                    description = "Name of the outbound a matching connection takes.";
                  };
                });
                default = [ ];
                example = literalExpression ''
                  [
                    { domains = [ "github.com" ]; ancestor = [ "*/git" ]; outbound = "direct"; }
                    { domains = [ "api.example.com" ]; process = [ "*/bin/curl" ];
                      exe_sha256 = [ "…" ]; outbound = "direct"; }
                  ]
                '';
                description = ''
                  This agent's own rules, in the daemon's rule format (`domains`,
                  `ips`, `ports`, and by process `process`, `comm`, `user`,
                  `ancestor`, `cgroup`, `exe_sha256`), limited to its cgroups
                  (`agents` is set to them). They come after the shared and the
                  agent's block lists and before the allow lists.
                '';
              };
              allowBus = mkOption {
                type = types.bool;
                default = false;
                description = ''
                  Leave systemd's and D-Bus's sockets visible to this agent's
                  units. Through them a process can have systemd start a
                  transient unit (`systemd-run`, D-Bus StartTransientUnit),
                  which runs outside the agent's cgroup and so outside the
                  capture; hidden by default. Container engines' sockets stay
                  hidden either way.
                '';
              };
              outbound = mkOption {
                type = types.nullOr types.str;
                default = null;
                description = ''
                  Outbound of this agent's allowed traffic (its own allow list
                  and the shared one); `null` is {option}`services.agentEgress.outbound`.
                '';
              };
              slice = mkOption {
                type = types.str;
                readOnly = true;
                default = agentSliceName name;
                defaultText = literalExpression ''"agent-egress-agents-''${name}.slice"'';
                description = ''
                  This agent's slice (dashes in the name escaped as `\x2d`):
                  `systemd-run --slice=` it to run a command as this agent.
                '';
              };
            };
          }
        )
      );
      default = { };
      description = "The agents: their units and their own policy.";
    };
  };

  config = mkMerge [
    {
      services.agentEgress.lists = lib.mapAttrs (_: preset: {
        description = mkDefault preset.description;
        domains = mkDefault preset.domains;
      }) presets;
    }

    (mkIf cfg.enable {
      assertions =
        let
          outbounds = builtinOutbounds ++ lib.attrNames settings.outbounds;
          unitOwners = lib.zipAttrs (
            lib.concatLists (
              lib.mapAttrsToList (name: agent: map (unit: { ${unitName unit} = name; }) agent.units) cfg.agents
            )
          );
          policies =
            [
              {
                where = "services.agentEgress.allow";
                policy = cfg.allow;
              }
              {
                where = "services.agentEgress.block";
                policy = cfg.block;
              }
            ]
            ++ lib.concatLists (
              lib.mapAttrsToList (name: agent: [
                {
                  where = "services.agentEgress.agents.${name}.allow";
                  policy = agent.allow;
                }
                {
                  where = "services.agentEgress.agents.${name}.block";
                  policy = agent.block;
                }
              ]) cfg.agents
            );
        in
        map (
          { where, policy }:
          {
            assertion = unknownLists policy.lists == [ ];
            message = "${where}.lists names unknown lists ${toString (unknownLists policy.lists)}; known: ${toString (lib.attrNames cfg.lists)}.";
          }
        ) policies
        ++ lib.mapAttrsToList (name: agent: {
          assertion = builtins.match "[A-Za-z0-9_-]+" name != null;
          message = "services.agentEgress.agents.\"${name}\": use letters, digits, '_' and '-' in agent names.";
        }) cfg.agents
        ++ lib.mapAttrsToList (name: agent: {
          assertion = lib.elem agent.outbound outbounds;
          message = "services.agentEgress.agents.${name}: outbound \"${agent.outbound}\" is not one of ${toString outbounds} (define it in services.agentEgress.settings.outbounds).";
        }) agents
        ++ lib.mapAttrsToList (unit: owners: {
          assertion = lib.length owners == 1;
          message = "systemd service ${unit} is listed by several agents (${toString owners}); a unit lives in one slice.";
        }) unitOwners
        ++ [
          {
            assertion = lib.elem cfg.outbound outbounds;
            message = "services.agentEgress.outbound \"${cfg.outbound}\" is not one of ${toString outbounds}.";
          }
          {
            assertion = !cfg.learn || settings.mode == "audit";
            message = "services.agentEgress.learn records what enforce would refuse and lets it through: it needs settings.mode = \"audit\", not \"${settings.mode}\".";
          }
          {
            assertion = !cfg.learn || (auditFile && (settings.audit.format or "json") == "json");
            message = "services.agentEgress.learn reads the audit records from a file in the JSON format: settings.audit.path is \"${settings.audit.path}\" and settings.audit.format \"${settings.audit.format or "json"}\" (give a file, and format \"json\").";
          }
          {
            assertion = cfg.control.supervisors == { } || cfg.control.enable;
            message = "services.agentEgress.control.supervisors (${toString (lib.attrNames cfg.control.supervisors)}) answer on the control socket: set services.agentEgress.control.enable = true.";
          }
          {
            assertion = settings.dns.servers != [ ];
            message = "services.agentEgress.settings.dns.servers is empty: enable services.resolved (its stub 127.0.0.53 is then the default) or list a resolver that listens on loopback (dnsmasq, unbound).";
          }
          {
            # Captured (the daemon's default), the agents' queries go to the
            # daemon's DNS handler over lo, and only the daemon asks the servers.
            assertion =
              (settings.dns.capture or true)
              || cfg.agentInterfaces != [ "lo" ]
              || lib.all loopbackServer settings.dns.servers;
            message = "services.agentEgress.settings.dns.servers must listen on loopback (e.g. 127.0.0.53 of services.resolved) when settings.dns.capture is false: the agents may use only lo (services.agentEgress.agentInterfaces). Found: ${toString settings.dns.servers}.";
          }
        ];

      warnings =
        lib.optional (settings.mode == "audit") "agent-egress runs in audit mode: agents' traffic is recorded, not blocked."
        ++ lib.optional (config.networking.firewall.enable && firewallBackend == "firewalld")
          "services.agentEgress: networking.firewall.backend is \"firewalld\", for which the module adds no reverse-path exception: captured agent traffic comes back in on lo with mark ${toString settings.interception.mark}, and if firewalld's reverse-path filter drops it the agents' connections fail (closed, nothing leaks). Let such packets pass in firewalld, or use the nftables or iptables backend.";

      services.agentEgress.settings = {
        control = mkIf cfg.control.enable {
          enable = true;
          socket = controlSocket;
          inherit (cfg.control) group;
        };
        state_dir = mkIf cfg.control.enable "/var/lib/agent-egress";
        mode = mkIf cfg.learn (mkDefault "audit");
        interception.cgroups = [ (sliceCgroupPath cfg.slice) ] ++ lib.concatMap (agent: agent.cgroups) (lib.attrValues agents);
        rules = mkMerge generatedRules;
      };

      environment.etc."agent-egress/config.json".source = configFile;
      environment.systemPackages = [ cfg.package ];

      users.users.agent-egress = {
        isSystemUser = true;
        group = "agent-egress";
        description = "agent-egress daemon";
      };
      users.groups.agent-egress = { };
      users.groups.${cfg.control.group} = mkIf cfg.control.enable { };

      systemd.services = mkMerge [
        (mkIf doctorTimer {
          agent-egress-doctor = {
            description = "agent-egress self-test";
            after = [ daemonUnit ];
            # Runs only while the daemon does: a stopped daemon is not a failure.
            unitConfig.Requisite = [ daemonUnit ];
            serviceConfig = {
              Type = "oneshot";
              ExecStart = doctorCommand;
            };
          };
        })
        (mkIf cfg.learn {
          agent-egress-learn = {
            description = "agent-egress: an allowlist suggested from the audit records";
            path = [
              cfg.package
              pkgs.coreutils
            ];
            script = learnScript;
            serviceConfig = sandbox // stateBind // unprivileged // {
              Type = "oneshot";
              User = "agent-egress";
              Group = "agent-egress";
              UMask = "0077";
              # It reads files and writes one: no socket at all.
              RestrictAddressFamilies = "none";
            };
          };
        })
        {
          agent-egress = {
            description = "agent-egress: egress control for AI agents";
            wantedBy = [ "multi-user.target" ];
            # After either firewall: a ruleset it loads (nftables may flush
            # everything) comes before our table, not over it.
            after = [
              "network.target"
              "nftables.service"
              "firewall.service"
            ];
            # A changed config is a reload (SIGHUP), which keeps open
            # connections and the agents bound to this unit running.
            reloadTriggers = [ configFile ];
            # What a reload cannot change (`reload` in src/daemon.rs refuses
            # it): a change here restarts the daemon instead.
            restartTriggers = [ restartOnly ];
            stopIfChanged = false;
            serviceConfig = {
              Type = "notify";
              ExecStart = "${lib.getExe cfg.package} run --config /etc/agent-egress/config.json";
              ExecStartPost = lib.optional settings.interception.manage_kernel doctor;
              ExecReload = "${lib.getExe' pkgs.coreutils "kill"} -HUP $MAINPID";
              Restart = "on-failure";
              RestartSec = "1s";

              User = "agent-egress";
              Group = "agent-egress";
              AmbientCapabilities = capabilities;
              CapabilityBoundingSet = capabilities;
              NoNewPrivileges = true;

              LogsDirectory = "agent-egress";
              LogsDirectoryMode = "0750";
              UMask = "0027";
              ReadWritePaths = lib.optional (auditFile && !auditInLogsDirectory) "-${dirOf settings.audit.path}";
              LimitNOFILE = 8 * settings.limits.connections + 1024;
            }
            // lib.optionalAttrs cfg.control.enable (stateBind // {
              # The socket's directory, and the runtime rules' state file.
              RuntimeDirectory = "agent-egress";
              RuntimeDirectoryMode = "0755";
              # A member may give the socket to the group without CAP_CHOWN.
              SupplementaryGroups = [ cfg.control.group ];
            })
            // sandbox
            // {
              # ProtectProc and ProcSubset keep their defaults: the daemon reads
              # the agents' /proc entries to name the process of a connection.
              RestrictAddressFamilies = [
                "AF_INET"
                "AF_INET6"
                "AF_NETLINK"
                "AF_UNIX"
              ];
              SystemCallFilter = [
                "@system-service"
                "~@privileged"
                "bpf" # the connect log; without it attribution searches /proc
              ]
              # @privileged holds @chown: the control socket goes to its group
              # by chown, which without CAP_CHOWN can only name a group the
              # daemon is a member of.
              ++ lib.optional cfg.control.enable "@chown";
            };
          };
        }
        (lib.mapAttrs' (
          name: supervisor:
          lib.nameValuePair "agent-egress-supervisor-${name}" {
            description = "agent-egress: the supervisor ${name}, on the control socket";
            wantedBy = [ "multi-user.target" ];
            # Not bound to the daemon: a restart of it is a failed request or
            # two for the script, which asks again.
            after = [ daemonUnit ];
            path = [
              cfg.package
              pkgs.coreutils
            ]
            ++ supervisor.path;
            inherit (supervisor) script;
            serviceConfig = sandbox // unprivileged // {
              Environment = [ "AGENT_EGRESS_CONTROL=${controlSocket}" ];
              DynamicUser = true;
              SupplementaryGroups = [ cfg.control.group ];
              Restart = "always";
              RestartSec = "2s";
              # The socket is a file: no network is needed to reach it.
              RestrictAddressFamilies = "AF_UNIX";
            };
          }
        ) cfg.control.supervisors)
        (lib.mkMerge (
          lib.mapAttrsToList (
            _: agent:
            lib.genAttrs (map unitName agent.units) (_: {
              bindsTo = [ daemonUnit ];
              after = [ daemonUnit ];
              serviceConfig = captureConfig // {
                Slice = agent.slice;
                InaccessiblePaths = hiddenSockets agent;
              };
            })
          ) agents
        ))
      ];

      systemd.timers.agent-egress-doctor = mkIf doctorTimer {
        description = "agent-egress self-test every ${cfg.doctorInterval}";
        wantedBy = [ "timers.target" ];
        timerConfig = {
          OnActiveSec = cfg.doctorInterval;
          OnUnitActiveSec = cfg.doctorInterval;
        };
      };

      systemd.timers.agent-egress-learn = mkIf cfg.learn {
        description = "agent-egress: suggest an allowlist every hour";
        wantedBy = [ "timers.target" ];
        timerConfig = {
          OnActiveSec = "1h";
          OnUnitActiveSec = "1h";
        };
      };

      # Slices carry the capture too, so ad-hoc members (systemd-run
      # --slice=...) are captured and restricted like declared units. They
      # are not bound to the daemon: a stopped daemon leaves such members
      # locked out rather than killed.
      systemd.slices = {
        ${lib.removeSuffix ".slice" cfg.slice} = {
          description = "AI agents under agent-egress control";
          # Created in the daemon's start transaction after its set exists.
          after = [ daemonUnit ];
          sliceConfig = captureConfig;
        };
      }
      // lib.mapAttrs' (
        name: agent:
        lib.nameValuePair (lib.removeSuffix ".slice" agent.slice) {
          description = "agent-egress agent ${name}";
          after = [ daemonUnit ];
          sliceConfig = captureConfig;
        }
      ) agents;

      # TPROXY'd packets come back in on lo carrying the mark. The kernel's
      # reverse-path checks (nft fib, xt_rpfilter) already pass packets on
      # lo; this keeps them passing whatever else the rpfilter chain grows.
      networking.firewall = mkIf config.networking.firewall.enable {
        extraReversePathFilterRules = mkIf (firewallBackend == "nftables") ''
          iifname "lo" meta mark ${toString settings.interception.mark} accept comment "agent-egress: captured agent traffic"
        '';
        extraCommands = mkIf (firewallBackend == "iptables") ''
          if ip46tables -t mangle -S nixos-fw-rpfilter >/dev/null 2>&1; then
            ip46tables -t mangle -I nixos-fw-rpfilter -i lo -m mark --mark ${toString settings.interception.mark} -j RETURN
          fi
        '';
      };

      services.logrotate.settings.agent-egress = mkIf auditFile {
        files = settings.audit.path;
        frequency = "weekly";
        rotate = 8;
        compress = true;
        delaycompress = true;
        missingok = true;
        notifempty = true;
        su = "agent-egress agent-egress";
        # No postrotate: NixOS's logrotate.service has no network (since
        # 24.11), so `systemctl reload` cannot reach systemd. The daemon
        # notices within a second that the path names a new file and
        # reopens it; records written meanwhile stay in the rotated one.
      };
    })
  ];
}
