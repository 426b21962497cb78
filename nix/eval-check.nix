# Evaluates nix/module.nix with nixpkgs' lib and nix/eval-stubs.nix, for
# nix/eval-check.sh: what the module generates, and every expectation that
# does not hold. Each case evaluates in its own directory for generated files.
# SPDX-License-Identifier: GPL-3.0-or-later
{
  libPath,
  packageDir,
  generatedDir,
}:

let
  lib = import libPath;
  inherit (builtins) toJSON;

  table = "agent_egress";
  nftSet = "cgroup:inet:${table}:agents";
  topSlice = "agent-egress-agents.slice";
  topCgroup = "agent.slice/agent-egress.slice/${topSlice}";
  daemonUnit = "agent-egress.service";

  # The real declarations of what the module sets and reads, per release.
  declarations = lib.importJSON ./nixos-declarations.json;
  releaseWithRole =
    role: lib.findFirst (name: declarations.releases.${name}.role == role) null (lib.attrNames declarations.releases);
  pinned = releaseWithRole "pinned";

  stubs =
    release: dir:
    import ./eval-stubs.nix {
      inherit packageDir release declarations;
      generatedDir = dir;
    };

  evaluateAt =
    release: name: modules:
    let
      dir = "${generatedDir}/${name}";
      evaluated = lib.evalModules {
        modules = [
          (stubs release dir)
          ./module.nix
        ]
        ++ modules;
      };
    in
    evaluated.config
    // {
      inherit dir;
      inherit (evaluated._module.args) pkgs;
    };

  evaluate = evaluateAt pinned;

  failedAssertions = config: map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);

  expect =
    what: actual: expected:
    lib.optional (actual != expected) "${what}: expected ${toJSON expected}, got ${toJSON actual}";
  expectAll =
    what: actual: wanted:
    lib.optional (!lib.all (w: lib.elem w actual) wanted) "${what}: expected to contain ${toJSON wanted}, got ${toJSON actual}";
  expectMatch =
    what: regex: actual:
    lib.optional (builtins.match regex actual == null) "${what}: ${toJSON actual} does not match ${regex}";

  # What every enabled configuration must have: the daemon unit as the issue
  # lays it out, the agents' units and slices wired to the capture.
  commonExpectations =
    name: config: agentUnits: agentSlices:
    let
      daemon = config.systemd.services.agent-egress;
      sc = daemon.serviceConfig;
      settings = config.services.agentEgress.settings;
      configFile = "${config.dir}/agent-egress-checked.json.out";
      caps = [
        "CAP_NET_ADMIN"
        "CAP_BPF"
        "CAP_SYS_PTRACE"
        "CAP_DAC_READ_SEARCH"
        "CAP_NET_RAW"
      ];
      unitExpectations =
        unit: slice:
        let
          svc = config.systemd.services.${unit};
        in
        expect "${name}: ${unit} Slice" svc.serviceConfig.Slice slice
        ++ expect "${name}: ${unit} NFTSet" svc.serviceConfig.NFTSet [ nftSet ]
        ++ expect "${name}: ${unit} RestrictNetworkInterfaces" svc.serviceConfig.RestrictNetworkInterfaces [
          "lo"
        ]
        ++ expectAll "${name}: ${unit} bindsTo" svc.bindsTo [ daemonUnit ]
        ++ expectAll "${name}: ${unit} after" svc.after [ daemonUnit ]
        # No transient units or containers outside the agent's cgroup.
        ++ expectAll "${name}: ${unit} InaccessiblePaths" svc.serviceConfig.InaccessiblePaths [
          "-/run/dbus/system_bus_socket"
          "-/run/systemd/private"
          "-/run/user/%U/bus"
          "-/run/docker.sock"
          "-/run/containerd/containerd.sock"
        ]
        # The agent's own settings survive the merge.
        ++ expect "${name}: ${unit} User" svc.serviceConfig.User "agent";
      sliceExpectations =
        slice:
        let
          unit = config.systemd.slices.${lib.removeSuffix ".slice" slice};
        in
        expect "${name}: ${slice} NFTSet" unit.sliceConfig.NFTSet [ nftSet ]
        ++ expect "${name}: ${slice} RestrictNetworkInterfaces" unit.sliceConfig.RestrictNetworkInterfaces [
          "lo"
        ]
        ++ expect "${name}: ${slice} is not bound to the daemon" unit.bindsTo [ ];
    in
    failedAssertions config
    ++ expect "${name}: Type" sc.Type "notify"
    ++ expect "${name}: ExecStart" sc.ExecStart "${packageDir}/bin/agent-egress run --config /etc/agent-egress/config.json"
    ++ expect "${name}: ExecReload" sc.ExecReload "/nix/store/eval-stub-coreutils/bin/kill -HUP $MAINPID"
    ++ expect "${name}: reloadTriggers" (map toString daemon.reloadTriggers) [ configFile ]
    ++ expect "${name}: /etc/agent-egress/config.json" (toString
      config.environment.etc."agent-egress/config.json".source
    ) configFile
    ++ expectAll "${name}: after" daemon.after [
      "nftables.service"
      "firewall.service"
    ]
    ++ expectAll "${name}: wantedBy" daemon.wantedBy [ "multi-user.target" ]
    ++ expect "${name}: AmbientCapabilities" sc.AmbientCapabilities caps
    ++ expect "${name}: CapabilityBoundingSet" sc.CapabilityBoundingSet caps
    ++ expect "${name}: User" sc.User "agent-egress"
    ++ expect "${name}: NoNewPrivileges" sc.NoNewPrivileges true
    ++ expect "${name}: ProtectSystem" sc.ProtectSystem "strict"
    ++ expect "${name}: ProtectHome" sc.ProtectHome true
    ++ expect "${name}: PrivateTmp" sc.PrivateTmp true
    ++ expect "${name}: ProtectControlGroups" sc.ProtectControlGroups true
    ++ expect "${name}: RestrictAddressFamilies" sc.RestrictAddressFamilies [
      "AF_INET"
      "AF_INET6"
      "AF_NETLINK"
      "AF_UNIX"
    ]
    ++ expect "${name}: SystemCallFilter" sc.SystemCallFilter (
      [
        "@system-service"
        "~@privileged"
        "bpf"
      ]
      # The control socket goes to its group by chown.
      ++ lib.optional config.services.agentEgress.control.enable "@chown"
    )
    ++ expect "${name}: LogsDirectory" sc.LogsDirectory "agent-egress"
    ++ expect "${name}: ExecStartPost" sc.ExecStartPost [
      "+${packageDir}/bin/agent-egress doctor --config /etc/agent-egress/config.json"
    ]
    ++ expect "${name}: doctor on a timer" config.systemd.services.agent-egress-doctor.serviceConfig.ExecStart "${packageDir}/bin/agent-egress doctor --config /etc/agent-egress/config.json"
    ++ expect "${name}: doctor timer" config.systemd.timers.agent-egress-doctor.timerConfig.OnUnitActiveSec "15min"
    ++ expect "${name}: daemon user" config.users.users.agent-egress.isSystemUser true
    ++ expect "${name}: audit rotation" config.services.logrotate.settings.agent-egress.files settings.audit.path
    ++ expect "${name}: interception.table" settings.interception.table table
    ++ expectAll "${name}: interception.cgroups" settings.interception.cgroups [ topCgroup ]
    ++ lib.concatMap (rule: expectAll "${name}: agents of rule ${rule.name}" settings.interception.cgroups (rule.agents or [ ])) settings.rules
    ++ lib.concatLists (lib.mapAttrsToList unitExpectations agentUnits)
    ++ lib.concatMap sliceExpectations ([ topSlice ] ++ agentSlices);

  ruleNames = config: map (rule: rule.name) config.services.agentEgress.settings.rules;
  ruleNamed =
    config: name: lib.findFirst (rule: rule.name == name) { } config.services.agentEgress.settings.rules;
  presetDomains = preset: (lib.importJSON (../presets + "/${preset}.json")).domains;

  example = evaluate "example" [ ./example-configuration.nix ];
  claudeSlice = "agent-egress-agents-claude\\x2dcode.slice";
  exampleFailures =
    commonExpectations "example" example
      {
        codex-nightly = "agent-egress-agents-codex.slice";
        "claude-code@" = claudeSlice;
      }
      [
        "agent-egress-agents-codex.slice"
        claudeSlice
      ]
    ++ expect "example: rules in order" (ruleNames example) [
      "metadata"
      "block"
      "agent/claude-code/block"
      "agent/claude-code/allow"
      "agent/codex/allow"
      "allow"
    ]
    ++ expect "example: interception.cgroups" example.services.agentEgress.settings.interception.cgroups [
      topCgroup
      "${topCgroup}/${claudeSlice}"
      "${topCgroup}/agent-egress-agents-codex.slice"
      "${topCgroup}/agent-egress-agents-codex.slice/codex-nightly.service"
    ]
    ++ expect "example: shared allow list expands presets" (ruleNamed example "allow").domains (
      presetDomains "npm" ++ presetDomains "github"
    )
    ++ expect "example: agent allow list" (ruleNamed example "agent/codex/allow").domains (
      presetDomains "openai"
      ++ [
        "git.example.com"
        "ci.example.com"
      ]
    )
    ++ expect "example: template units are covered by the agent's slice" (ruleNamed example
      "agent/claude-code/allow"
    ).agents [ "${topCgroup}/${claudeSlice}" ]
    ++ expect "example: dns.servers" example.services.agentEgress.settings.dns.servers [ "127.0.0.53" ]
    ++ expect "example: freeform settings pass through" example.services.agentEgress.settings.dns.domain_dial "verify"
    ++ expectMatch "example: nftables rpfilter exception"
      ''.*iifname "lo" meta mark 2785 accept.*''
      example.networking.firewall.extraReversePathFilterRules
    ++ expect "example: no iptables commands with the nftables firewall" example.networking.firewall.extraCommands ""
    ++ supervisorFailures;

  # The example's supervisor: its own user in the control group, the socket
  # in its environment, nothing else reachable, started with the system.
  supervisorFailures =
    let
      unit = example.systemd.services.agent-egress-supervisor-by-host or { };
      sc = unit.serviceConfig or { };
      control = example.services.agentEgress.settings.control or { };
    in
    lib.optional (unit == { }) "example: no agent-egress-supervisor-by-host.service"
    ++ lib.optionals (unit != { }) (
      expect "supervisor: DynamicUser" sc.DynamicUser true
      ++ expect "supervisor: group" sc.SupplementaryGroups [ control.group ]
      ++ expect "supervisor: socket" sc.Environment [ "AGENT_EGRESS_CONTROL=${control.socket}" ]
      ++ expect "supervisor: PrivateNetwork" sc.PrivateNetwork true
      ++ expect "supervisor: RestrictAddressFamilies" sc.RestrictAddressFamilies "AF_UNIX"
      ++ expect "supervisor: CapabilityBoundingSet" sc.CapabilityBoundingSet ""
      ++ expect "supervisor: Restart" sc.Restart "always"
      ++ expect "supervisor: the daemon's sandbox" sc.InaccessiblePaths example.systemd.services.agent-egress.serviceConfig.InaccessiblePaths
      ++ expectAll "supervisor: wantedBy" unit.wantedBy [ "multi-user.target" ]
      ++ expectAll "supervisor: after" unit.after [ daemonUnit ]
      ++ expectAll "supervisor: path" (map toString unit.path) [ packageDir ]
      ++ expectMatch "supervisor: long-polls the questions" ".*/v1/questions.*next[?]timeout_ms=.*" unit.script
      ++ expect "example: the default asks" example.services.agentEgress.settings.default "ask"
      ++ expect "example: the control socket" control.socket "/run/agent-egress/control.sock"
      ++ lib.optional (!lib.elem control.group (lib.attrNames example.users.groups)) "example: no group ${control.group}"
    );

  # Every knob at once, with the iptables firewall.
  fixture = evaluate "fixture" [
    {
      services.resolved.enable = true;
      users.users.agent.isSystemUser = true;
      systemd.services.research-bot.serviceConfig.User = "agent";
      systemd.services."agent-probe@".serviceConfig = {
        User = "agent";
        NFTSet = "cgroup:inet:other:set";
      };
      services.agentEgress = {
        enable = true;
        slice = "ai-agents.slice";
        allow.domains = [ "allowed.test" ];
        block = {
          domains = [ "blocked.test" ];
          ips = [ "198.51.100.0/24" ];
        };
        lists.shared.domains = [ "shared.example" ];
        lists.github.domains = [ "github.example" ];
        agents.research-bot = {
          units = [ "research-bot.service" ];
          outbound = "tor";
          allowBus = true;
          allow.lists = [
            "shared"
            "github"
          ];
        };
        agents.tester.units = [ "agent-probe@" ];
        control = {
          enable = true;
          group = "supervisors";
        };
        settings = {
          outbounds.tor = {
            type = "socks5";
            server = "127.0.0.1:9050";
          };
          rules = [
            {
              name = "intranet";
              ips = [ "10.0.0.0/8" ];
              outbound = "direct";
            }
          ];
          audit.path = "/srv/audit/agent-egress.jsonl";
          interception.mark = 4242;
          limits.connections = 100;
        };
      };
    }
  ];
  fixtureTop = "ai.slice/ai-agents.slice";
  fixtureFailures =
    failedAssertions fixture
    # allowBus leaves the bus to the agent, never the container engines.
    ++ (
      let
        hidden = fixture.systemd.services.research-bot.serviceConfig.InaccessiblePaths;
      in
      lib.optional (lib.elem "-/run/dbus/system_bus_socket" hidden) "fixture: allowBus still hides the system bus"
      ++ expectAll "fixture: allowBus keeps the engines hidden" hidden [ "-/run/docker.sock" ]
    )
    ++ expect "fixture: rules in order" (ruleNames fixture) [
      "metadata"
      "intranet"
      "block" # its names
      "block" # its addresses
      "agent/research-bot/allow"
      "agent/research-bot/shared-allow"
      "allow"
    ]
    ++ expect "fixture: interception.cgroups" fixture.services.agentEgress.settings.interception.cgroups [
      fixtureTop
      "${fixtureTop}/ai-agents-research\\x2dbot.slice"
      "${fixtureTop}/ai-agents-research\\x2dbot.slice/research-bot.service"
      "${fixtureTop}/ai-agents-tester.slice"
    ]
    ++ expect "fixture: redefined list replaces the preset" (ruleNamed fixture "agent/research-bot/allow")
      .domains
      [
        "shared.example"
        "github.example"
      ]
    ++ expect "fixture: agent outbound" (ruleNamed fixture "agent/research-bot/allow").outbound "tor"
    ++ expect "fixture: shared allow list via the agent's outbound" (ruleNamed fixture
      "agent/research-bot/shared-allow"
    ) {
      name = "agent/research-bot/shared-allow";
      outbound = "tor";
      domains = [ "allowed.test" ];
      agents = [
        "${fixtureTop}/ai-agents-research\\x2dbot.slice"
        "${fixtureTop}/ai-agents-research\\x2dbot.slice/research-bot.service"
      ];
    }
    ++ expect "fixture: block rules, names and addresses apart (fields AND)" (lib.filter (
      rule: rule.name == "block"
    ) fixture.services.agentEgress.settings.rules) [
      {
        name = "block";
        outbound = "block";
        domains = [ "blocked.test" ];
      }
      {
        name = "block";
        outbound = "block";
        ips = [ "198.51.100.0/24" ];
      }
    ]
    ++ expect "fixture: .service suffix accepted" fixture.systemd.services.research-bot.serviceConfig.Slice "ai-agents-research\\x2dbot.slice"
    ++ expect "fixture: a unit's own NFTSet is kept" (lib.sort lib.lessThan
      fixture.systemd.services."agent-probe@".serviceConfig.NFTSet
    ) [
      nftSet
      "cgroup:inet:other:set"
    ]
    ++ expect "fixture: audit file outside the logs directory is writable" fixture.systemd.services.agent-egress.serviceConfig.ReadWritePaths [
      "-/srv/audit"
    ]
    ++ expect "fixture: LimitNOFILE follows limits.connections" fixture.systemd.services.agent-egress.serviceConfig.LimitNOFILE 1824
    ++ expectMatch "fixture: iptables rpfilter exception"
      ".*ip46tables -t mangle -I nixos-fw-rpfilter -i lo -m mark --mark 4242 -j RETURN.*"
      fixture.networking.firewall.extraCommands
    ++ expect "fixture: no nftables rules with the iptables firewall" fixture.networking.firewall.extraReversePathFilterRules ""
    ++ expect "fixture: control socket and state" {
      inherit (fixture.services.agentEgress.settings) control state_dir;
      group = fixture.users.groups ? supervisors;
      inherit (fixture.systemd.services.agent-egress.serviceConfig)
        RuntimeDirectory
        StateDirectory
        SupplementaryGroups
        ;
    } {
      control = {
        enable = true;
        socket = "/run/agent-egress/control.sock";
        group = "supervisors";
      };
      state_dir = "/var/lib/agent-egress";
      group = true;
      RuntimeDirectory = "agent-egress";
      StateDirectory = "agent-egress";
      SupplementaryGroups = [ "supervisors" ];
    }
    ++ expect "fixture: the metadata block is locked" (ruleNamed fixture "metadata").locked true
    ++ expect "learn: no control socket by default" (learn.services.agentEgress.settings ? control) false;

  # The flake's module builds the package from the system's nixpkgs.
  flake = (import ../flake.nix).outputs {
    self = flake;
    nixpkgs = { inherit lib; };
  };
  flakeModule = evaluate "flake-module" [
    flake.nixosModules.default
    {
      services.resolved.enable = true;
      services.agentEgress.enable = true;
    }
  ];
  flakeFailures =
    failedAssertions flakeModule
    ++ expect "flake module: package" flakeModule.services.agentEgress.package.name "callPackage package.nix";

  # nix/package.nix with a stand-in rustPlatform: what the build is given.
  # lib.fileset needs builtins this Nix may lack (lib's minfeatures.nix).
  packageEvaluable =
    !builtins.pathExists "${libPath}/minfeatures.nix"
    || (import "${libPath}/minfeatures.nix").missing == [ ];
  package = import ./package.nix {
    inherit lib;
    rustPlatform = {
      buildRustPackage = args: args;
      bindgenHook = "bindgen-hook";
    };
    linuxHeaders = "linux-headers";
    testers.testVersion = { package }: "version test of ${package.pname}";
  };
  packageFailures = lib.optionals packageEvaluable (
    expect "package: version" package.version (lib.importTOML ../Cargo.toml).package.version
    ++ expect "package: Cargo.lock" package.cargoLock.lockFile ../Cargo.lock
    ++ expectMatch "package: sources" "/nix/store/[a-z0-9]{32}-source" "${package.src}"
    ++ expect "package: bindgen" package.nativeBuildInputs [ "bindgen-hook" ]
    ++ expect "package: mainProgram" package.meta.mainProgram "agent-egress"
    ++ expect "package: passthru.tests" package.passthru.tests { version = "version test of agent-egress"; }
    ++ expect "package: maintainers" (map (m: m.github) package.meta.maintainers) [ "agent-egress" ]
  );

  # Configurations the module must refuse, each with the message it gives.
  refused = {
    unknown-list = {
      modules = [
        {
          services.resolved.enable = true;
          services.agentEgress = {
            enable = true;
            agents.a.allow.lists = [ "no-such-list" ];
          };
        }
      ];
      message = "services.agentEgress.agents.a.allow.lists names unknown lists no-such-list;";
    };
    remote-resolver-uncaptured = {
      modules = [
        {
          services.agentEgress = {
            enable = true;
            settings.dns = {
              servers = [ "192.0.2.53" ];
              capture = false;
            };
          };
        }
      ];
      message = "services.agentEgress.settings.dns.servers must listen on loopback";
    };
    learn-enforcing = {
      modules = [
        {
          services.resolved.enable = true;
          services.agentEgress = {
            enable = true;
            learn = true;
            settings.mode = "enforce";
          };
        }
      ];
      message = "services.agentEgress.learn records what enforce would refuse and lets it through: it needs settings.mode = \"audit\"";
    };
    learn-from-the-journal = {
      modules = [
        {
          services.resolved.enable = true;
          services.agentEgress = {
            enable = true;
            learn = true;
            settings.audit.path = "-";
          };
        }
      ];
      message = "services.agentEgress.learn reads the audit records from a file in the JSON format";
    };
    learn-from-ocsf = {
      modules = [
        {
          services.resolved.enable = true;
          services.agentEgress = {
            enable = true;
            learn = true;
            settings.audit.format = "ocsf";
          };
        }
      ];
      message = "services.agentEgress.learn reads the audit records from a file in the JSON format";
    };
    supervisor-without-control = {
      modules = [
        {
          services.resolved.enable = true;
          services.agentEgress = {
            enable = true;
            control.supervisors.s.script = "true";
          };
        }
      ];
      message = "services.agentEgress.control.supervisors (s) answer on the control socket";
    };
    no-resolver = {
      modules = [ { services.agentEgress.enable = true; } ];
      message = "services.agentEgress.settings.dns.servers is empty";
    };
    unknown-outbound = {
      modules = [
        {
          services.resolved.enable = true;
          services.agentEgress = {
            enable = true;
            agents.a.outbound = "tor";
          };
        }
      ];
      message = ''services.agentEgress.agents.a: outbound "tor" is not one of direct block'';
    };
    unit-in-two-agents = {
      modules = [
        {
          services.resolved.enable = true;
          services.agentEgress = {
            enable = true;
            agents.a.units = [ "shared" ];
            agents.b.units = [ "shared.service" ];
          };
        }
      ];
      message = "systemd service shared is listed by several agents (a b)";
    };
  };
  refusedFailures = lib.concatLists (
    lib.mapAttrsToList (
      name: case:
      let
        messages = failedAssertions (evaluate name case.modules);
      in
      lib.optional (!lib.any (lib.hasPrefix case.message) messages) "refused ${name}: expected an assertion starting ${toJSON case.message}, got ${toJSON messages}"
    ) refused
  );

  # Every preset's patterns go through the daemon's check.
  allPresets = evaluate "all-presets" [
    {
      services.resolved.enable = true;
      services.agentEgress = {
        enable = true;
        allow.lists = map (lib.removeSuffix ".json") (lib.attrNames (builtins.readDir ../presets));
      };
    }
  ];

  # learn: the daemon in audit mode, and an hourly service that writes what
  # `suggest` makes of the audit files to the state directory.
  learn = evaluate "learn" [
    {
      services.resolved.enable = true;
      services.agentEgress = {
        enable = true;
        learn = true;
      };
    }
  ];
  learnFailures =
    let
      service = learn.systemd.services.agent-egress-learn;
      sc = service.serviceConfig;
      timer = learn.systemd.timers.agent-egress-learn;
    in
    commonExpectations "learn" learn { } [ ]
    ++ expect "learn: mode" learn.services.agentEgress.settings.mode "audit"
    ++ expect "learn: Type" sc.Type "oneshot"
    ++ expect "learn: User" sc.User "agent-egress"
    ++ expect "learn: StateDirectory" sc.StateDirectory "agent-egress"
    ++ expect "learn: PrivateNetwork" sc.PrivateNetwork true
    ++ expect "learn: RestrictAddressFamilies" sc.RestrictAddressFamilies "none"
    ++ expect "learn: CapabilityBoundingSet" sc.CapabilityBoundingSet ""
    ++ expect "learn: NoNewPrivileges" sc.NoNewPrivileges true
    ++ expect "learn: ProtectSystem" sc.ProtectSystem "strict"
    ++ expect "learn: the daemon's sandbox" sc.InaccessiblePaths learn.systemd.services.agent-egress.serviceConfig.InaccessiblePaths
    ++ expectAll "learn: path" (map toString service.path) [ packageDir ]
    ++ expectMatch "learn: suggest over the audit file and its rotated copies"
      ".*agent-egress suggest --format nix --audit '?/var/log/agent-egress/audit.jsonl'?[*] >\"[$]tmp\".*"
      service.script
    ++ expectMatch "learn: written whole, then renamed"
      ".*tmp=[$][(]mktemp /var/lib/agent-egress/suggested.nix.XXXXXX[)].*mv \"[$]tmp\" /var/lib/agent-egress/suggested.nix.*"
      service.script
    ++ expectAll "learn: timer wantedBy" timer.wantedBy [ "timers.target" ]
    ++ expect "learn: timer" timer.timerConfig.OnUnitActiveSec "1h"
    ++ lib.optional (example.systemd.services ? agent-egress-learn) "example: a learn service without learn"
    ++ lib.optional (example.systemd.timers ? agent-egress-learn) "example: a learn timer without learn";

  # suggest's golden Nix output (tests/suggest.rs holds suggest to it) dropped
  # into services.agentEgress.agents unchanged.
  suggested = evaluate "suggested" [
    {
      services.resolved.enable = true;
      services.agentEgress = {
        enable = true;
        agents = import ../tests/fixtures/suggest/suggested.nix;
      };
    }
  ];
  suggestedFailures =
    let
      rules = suggested.services.agentEgress.settings.rules;
      named = name: lib.filter (rule: rule.name == name) rules;
    in
    failedAssertions suggested
    ++ expect "suggested: openclaw's rules" (named "agent/openclaw/allow") [
      {
        name = "agent/openclaw/allow";
        agents = [ "${topCgroup}/agent-egress-agents-openclaw.slice" ];
        domains = [
          "=alice.github.io"
          "=api.anthropic.com"
          "=bob.github.io"
          "github.com"
          "=objects.githubusercontent.com"
        ];
        outbound = "direct";
      }
      {
        # Addresses in a rule of their own: fields AND, one rule would match neither.
        name = "agent/openclaw/allow";
        agents = [ "${topCgroup}/agent-egress-agents-openclaw.slice" ];
        ips = [ "203.0.113.9" ];
        outbound = "direct";
      }
    ]
    ++ expect "suggested: research-bot's domains" (map (rule: rule.domains or null) (named "agent/research-bot/allow")) [
      [
        "=example.com"
        "=files.pythonhosted.org"
        "huggingface.co"
        "=pypi.org"
      ]
    ];

  # The daemon refuses this one: Nix lets it through, `check` must not.
  daemonRejects = evaluate "daemon-rejects" [
    {
      services.resolved.enable = true;
      services.agentEgress = {
        enable = true;
        settings.limits.sniff_bytes = 100;
      };
    }
  ];

  # Every option the stubs declare, with its type and default, as the real
  # declarations list them: submodule options under their attribute name
  # `<name>`, the stubs' internals (`_module`) left out.
  stubOptions =
    release:
    let
      walk =
        options:
        lib.concatLists (
          lib.mapAttrsToList (
            name: value:
            if lib.hasPrefix "_" name then
              [ ]
            else if lib.isOption value then
              [ value ] ++ walk (value.type.getSubOptions value.loc)
            else if lib.isAttrs value then
              walk value
            else
              [ ]
          ) options
        );
      evaluated = lib.evalModules { modules = [ (stubs release "${generatedDir}/stubs-${release}") ]; };
    in
    lib.listToAttrs (map (option: lib.nameValuePair (lib.showOption option.loc) option) (walk evaluated.options));

  # The stubs of a release against its real declarations: the same options,
  # types and (literal) defaults.
  declarationFailures =
    release:
    let
      stubbed = stubOptions release;
      real = lib.filterAttrs (_: option: option.${release} or null != null) declarations.options;
      literal = fact: !(lib.isAttrs (fact.default or null) && fact.default ? expression);
      compare =
        path: option:
        if !(real ? ${path}) then
          [
            "stubs at ${release}: ${path} is declared, but nix/nixos-declarations.json has no real declaration of it at ${release}"
          ]
        else
          let
            fact = real.${path}.${release};
          in
          expect "stubs at ${release}: type of ${path}" option.type.description fact.type
          ++ lib.optionals (literal fact) (
            expect "stubs at ${release}: default of ${path}" (option.default or null) (fact.default or null)
          );
    in
    lib.concatLists (lib.mapAttrsToList compare stubbed)
    ++ map (path: "stubs at ${release}: ${path} exists in nixpkgs but not in the stubs") (
      lib.attrNames (removeAttrs real (lib.attrNames stubbed))
    );

  # A switch reloads the daemon for what a reload applies and restarts it for
  # what it cannot (listen, audit, the table: src/daemon.rs `reload`).
  restartTriggersWith =
    name: settings:
    (evaluate name [
      {
        services.resolved.enable = true;
        services.agentEgress = {
          enable = true;
          inherit settings;
        };
      }
    ]).systemd.services.agent-egress.restartTriggers;
  triggerFailures =
    let
      base = restartTriggersWith "triggers-base" { };
      restarts =
        what: settings:
        lib.optional (restartTriggersWith "triggers-${what}" settings == base)
          "restartTriggers: a change of ${what} leaves them as they were: a switch would reload, which the daemon refuses";
    in
    expect "restartTriggers: a change of limits reloads" (restartTriggersWith "triggers-limits" {
      limits.idle_timeout_s = 61;
    }) base
    ++ restarts "audit.path" { audit.path = "-"; }
    ++ restarts "listen.port" { listen.port = 15002; }
    ++ restarts "interception.table" { interception.table = "other_table"; };

  # The example on every release: the module reads release-dependent options
  # defensively, and nothing it sets is missing there.
  releaseFailures = lib.concatMap (
    release:
    let
      config = evaluateAt release "example-${release}" [ ./example-configuration.nix ];
    in
    declarationFailures release
    ++ map (message: "example at ${release}: ${message}") (failedAssertions config)
    ++ expectMatch "example at ${release}: nftables rpfilter exception" ''.*iifname "lo" meta mark 2785 accept.*''
      config.networking.firewall.extraReversePathFilterRules
  ) (lib.attrNames declarations.releases)
  # The firewall backends as each release knows them: on 25.05 (no
  # networking.firewall.backend) the iptables firewall unless nftables is on;
  # firewalld, where it exists, gets a warning instead of a silent nothing.
  ++ (
    let
      withFirewall =
        release: name: firewall:
        evaluateAt release name [
          {
            services.resolved.enable = true;
            services.agentEgress.enable = true;
            networking = firewall;
          }
        ];
      iptables = withFirewall "25.05" "iptables-25.05" { };
      firewalld = withFirewall pinned "firewalld-${pinned}" { firewall.backend = "firewalld"; };
    in
    expectMatch "iptables at 25.05: rpfilter exception" ".*-m mark --mark 2785 -j RETURN.*" iptables.networking.firewall.extraCommands
    ++ expect "iptables at 25.05: no nftables rule" iptables.networking.firewall.extraReversePathFilterRules ""
    ++ lib.optional (!lib.any (lib.hasInfix "firewalld") firewalld.warnings) "firewalld at ${pinned}: no warning that the module adds no exception there"
    ++ expect "firewalld at ${pinned}: no rule for the other backends" (
      firewalld.networking.firewall.extraCommands + firewalld.networking.firewall.extraReversePathFilterRules
    ) ""
  );

  # The VM test's script as the test driver gets it, for eval-check.sh to
  # compare with vm-tests/scenarios.txt and lint.
  vmTest = import ../vm-tests/agent-egress.nix {
    inherit (example) pkgs;
    module = ./module.nix;
    firewallBackend = "nftables";
  };
  vmScript = vmTest.testScript {
    nodes = {
      internet.networking = {
        primaryIPAddress = "192.168.1.2";
        primaryIPv6Address = "2001:db8:1::2";
      };
      agent = {
        networking.primaryIPv6Address = "2001:db8:1::1";
        system.build.toplevel = "/nix/store/eval-stub-toplevel";
        services.agentEgress = example.services.agentEgress // {
          agents.tester.slice = "agent-egress-agents-tester.slice";
        };
      };
    };
  };

  # What eval-check.sh runs: the JSON each case generated and the build
  # command that checks it (as the derivation would run it).
  generated = config: {
    inherit (config) dir;
    json = toJSON config.services.agentEgress.settings;
    checkCommand = config.environment.etc."agent-egress/config.json".source.buildCommand;
    # Unit sections as NixOS writes them, for systemd-analyze verify and the
    # systemd VM: the daemon, the agents' units and every slice.
    units =
      {
        "agent-egress.service" = unitSections config.systemd.services.agent-egress "Service" "serviceConfig";
      }
      // lib.optionalAttrs (config.systemd.services ? agent-egress-learn) {
        "agent-egress-learn.service" = unitSections config.systemd.services.agent-egress-learn "Service" "serviceConfig";
        "agent-egress-learn.timer" = unitSections config.systemd.timers.agent-egress-learn "Timer" "timerConfig";
      }
      // lib.optionalAttrs (config.systemd.services ? agent-egress-doctor) {
        "agent-egress-doctor.service" = unitSections config.systemd.services.agent-egress-doctor "Service" "serviceConfig";
        "agent-egress-doctor.timer" = unitSections config.systemd.timers.agent-egress-doctor "Timer" "timerConfig";
      }
      // lib.mapAttrs' (
        name: _:
        lib.nameValuePair "agent-egress-supervisor-${name}.service" (
          unitSections config.systemd.services."agent-egress-supervisor-${name}" "Service" "serviceConfig"
        )
      ) config.services.agentEgress.control.supervisors
      // lib.listToAttrs (
        lib.concatMap (
          agent:
          map (
            unit:
            let
              name = lib.removeSuffix ".service" unit;
            in
            lib.nameValuePair "${name}.service" (
              unitSections config.systemd.services.${name} "Service" "serviceConfig"
            )
          ) agent.units
        ) (lib.attrValues config.services.agentEgress.agents)
      )
      // lib.mapAttrs' (
        name: slice: lib.nameValuePair "${name}.slice" (unitSections slice "Slice" "sliceConfig")
      ) config.systemd.slices;
    logrotate = config.services.logrotate.settings.agent-egress or null;
    # The groups NixOS would create (users.groups), for the guest to add.
    groups = lib.attrNames config.users.groups;
    # The units NixOS gives an ExecStart made of `script` (the learn unit):
    # its text and `path`, for the systemd VM to install as NixOS would.
    scripts = lib.mapAttrs' (name: unit: lib.nameValuePair "${name}.service" {
      text = unit.script;
      path = map (p: "${p}/bin") unit.path;
    }) (lib.filterAttrs (_: unit: (unit.script or "") != "") config.systemd.services);
  };

  # A unit's [Unit], [Service] or [Slice], and [Install] sections, empty
  # settings left out.
  unitSections =
    unit: section: settings:
    lib.filterAttrs (_: values: values != { }) {
      Unit = lib.filterAttrs (_: value: value != [ ] && value != "") {
        # As NixOS writes them, for the guest to decide reload or restart
        # as switch-to-configuration would.
        X-Reload-Triggers = map toString (unit.reloadTriggers or [ ]);
        X-Restart-Triggers = map toString (unit.restartTriggers or [ ]);
        Description = unit.description;
        After = unit.after;
        BindsTo = unit.bindsTo;
        Wants = unit.wants;
        Requires = unit.requires;
      }
      // unit.unitConfig;
      ${section} = unit.${settings};
      Install = lib.filterAttrs (_: value: value != [ ]) { WantedBy = unit.wantedBy; };
    };

  # What the systemd VM test (tests/systemd_vm.rs) installs in its guest: an
  # agent template unit as tests define them, audit to a file or the journal.
  systemdVm =
    name: audit: extra:
    evaluate name [
      {
        services.agentEgress = {
          enable = true;
          allow.domains = [ "allowed.test" ];
          agents.tester.units = [ "agent-probe@" ];
          settings.dns.servers = [ "127.0.0.53" ];
          settings.audit = audit;
        };
      }
      { services.agentEgress = extra; }
    ];
in
{
  failures = releaseFailures ++ triggerFailures ++ exampleFailures ++ fixtureFailures ++ learnFailures ++ suggestedFailures ++ flakeFailures ++ packageFailures ++ refusedFailures;
  inherit packageEvaluable;
  inherit vmScript;
  # For eval-check.sh to run on the suggest fixture.
  learnScript = learn.systemd.services.agent-egress-learn.script;
  accepted = {
    example = generated example;
    fixture = generated fixture;
    all-presets = generated allPresets;
    learn = generated learn;
    suggested = generated suggested;
  };
  systemd = {
    file-audit = generated (systemdVm "systemd-file-audit" { } { });
    journal-audit = generated (systemdVm "systemd-journal-audit" { path = "-"; } { });
    learn = generated (systemdVm "systemd-learn" { } { learn = true; control.enable = true; });
    # The example's supervisor answering an ask rule's questions.
    supervisor = generated (
      systemdVm "systemd-supervisor" { } {
        control.enable = true;
        control.supervisors.by-host = example.services.agentEgress.control.supervisors.by-host;
        agents.tester.rules = [
          {
            name = "ask-supervisor";
            domains = [
              "pypi.org"
              "paste.test"
            ];
            outbound = "ask";
          }
        ];
        settings.ask.timeout_ms = 15000;
      }
    );
  };
  rejected = {
    sniff-bytes = generated daemonRejects // {
      message = "limits.sniff_bytes";
    };
  };
}
