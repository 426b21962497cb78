# NixOS VM test of agent-egress: an "internet" (nginx over TLS and HTTP,
# IPv4 and IPv6, with an allowed and a blocked site, a DNS server, a UDP sink
# and a metadata service) and an agent machine with the firewall on, whose
# agent units in the captured slice run curl and headless Chromium.
# SPDX-License-Identifier: GPL-3.0-or-later
{
  pkgs,
  # The agent-egress NixOS module, with its package set.
  module,
  # "nftables" or "iptables": the NixOS firewall the agent machine runs.
  firewallBackend,
}:

let
  testCA = pkgs.callPackage ./test-ca.nix { };

  # Secondary addresses of the internet machine.
  blocked4 = "192.168.1.200";
  blocked6 = "2001:db8:1::200";
  metadata4 = "169.254.169.254";

  sites = pkgs.runCommand "agent-egress-test-sites" { } ''
    mkdir -p $out/allowed $out/blocked $out/later $out/idn $out/metadata
    echo allowed-site-marker > $out/allowed/index.html
    echo blocked-site-marker > $out/blocked/index.html
    echo later-site-marker > $out/later/index.html
    echo idn-site-marker > $out/idn/index.html
    echo metadata-marker > $out/metadata/index.html
    # A 1x1 PNG.
    echo iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg== \
      | base64 -d > $out/blocked/pixel.png
    cp $out/blocked/pixel.png $out/allowed/pixel.png
    cat > $out/allowed/page.html <<'EOF'
    <!DOCTYPE html>
    <html><head><title>allowed page</title></head><body>
    <p>allowed-page-marker</p>
    <p id="status">subresource-pending</p>
    <img src="https://blocked.test/pixel.png?c=chromium"
      onload="document.getElementById('status').textContent = 'subresource-loaded'"
      onerror="document.getElementById('status').textContent = 'subresource-blocked'">
    </body></html>
    EOF
    cat > $out/allowed/quic.html <<'EOF'
    <!DOCTYPE html>
    <html><head><title>quic page</title></head><body>
    <p>quic-page-marker</p>
    <img src="/pixel.png?c=quic">
    </body></html>
    EOF
    head -c ${toString (20 * 1024 * 1024)} /dev/zero > $out/allowed/big
  '';

  probeDir = "/run/agent-probe";

  # Runs PROBE_DIR/NAME.cmd as the agent and leaves its output, exit code,
  # pid and duration beside it.
  probe = pkgs.writeShellScript "agent-probe" ''
    export HOME="${probeDir}/home-$1"
    mkdir -p "$HOME"
    start=$(date +%s%N)
    ${pkgs.bash}/bin/bash "${probeDir}/$1.cmd" > "${probeDir}/$1.out" 2>&1 &
    echo $! > "${probeDir}/$1.pid"
    wait $!
    echo $? > "${probeDir}/$1.rc"
    echo $(( ($(date +%s%N) - start) / 1000000 )) > "${probeDir}/$1.ms"
  '';
in
{
  name = "agent-egress-${firewallBackend}";

  nodes.internet =
    { config, pkgs, ... }:
    let
      ipv4 = config.networking.primaryIPAddress;
      ipv6 = config.networking.primaryIPv6Address;
      tls = {
        addSSL = true;
        sslCertificate = "${testCA}/server.crt";
        sslCertificateKey = "${testCA}/server.key";
      };
      primary = [
        ipv4
        "[${ipv6}]"
      ];
    in
    {
      networking.firewall.enable = false;
      # closed_flows_stay_captured counts the packets that reach the refused host.
      environment.systemPackages = [ pkgs.nftables ];
      # nginx binds the secondary addresses while IPv6 may still be doing
      # duplicate address detection.
      boot.kernel.sysctl = {
        "net.ipv4.ip_nonlocal_bind" = 1;
        "net.ipv6.ip_nonlocal_bind" = 1;
      };
      networking.interfaces.eth1 = {
        ipv4.addresses = [
          {
            address = blocked4;
            prefixLength = 24;
          }
          {
            address = metadata4;
            prefixLength = 32;
          }
        ];
        ipv6.addresses = [
          {
            address = blocked6;
            prefixLength = 64;
          }
        ];
      };

      services.dnsmasq = {
        enable = true;
        resolveLocalQueries = false;
        settings = {
          no-resolv = true;
          no-hosts = true;
          log-queries = true;
          host-record = [
            "allowed.test,${ipv4},${ipv6}"
            "later.test,${ipv4},${ipv6}"
            "xn--bcher-kva.test,${ipv4},${ipv6}"
            "blocked.test,${blocked4},${blocked6}"
            # DNS rebinding: allowed names that lead to where no name may.
            "rebind-md.allowed.test,${metadata4}"
            "rebind-pv.allowed.test,10.1.2.3"
            # The public name of allowed.test's ECH config.
            "public.test,${ipv4},${ipv6}"
            # Names only the tester's rules by process allow.
            "proc.test,${ipv4}"
            "git.test,${ipv4}"
            "pinned.test,${ipv4}"
            # Names the tester's rules ask a supervisor about.
            "pypi.org,${ipv4}"
            "paste.test,${ipv4}"
          ];
          # An HTTPS record with an ECH config (alpn h2, ech: one config that
          # Chromium accepts, public name public.test; the e2e world's
          # tests/harness/dns.rs spells it out), which the agents get without.
          dns-rr = [
            (
              "allowed.test,65,0001000001000302683200050040"
              + "003efe0d003a0100200020"
              + "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
              + "000400010001400b7075626c69632e746573740000"
            )
          ];
        };
      };

      services.nginx = {
        enable = true;
        package = pkgs.nginxQuic;
        commonHttpConfig = ''
          log_format probe '$server_addr $remote_addr $host "$request" $status $server_protocol';
          access_log /var/log/nginx/probe.log probe;
        '';
        virtualHosts = {
          "allowed.test" = tls // {
            listenAddresses = primary;
            quic = true;
            reuseport = true;
            root = "${sites}/allowed";
            # Chromium learns of HTTP/3 from this header.
            extraConfig = ''
              add_header Alt-Svc 'h3=":443"; ma=86400' always;
            '';
            locations."/big".extraConfig = "limit_rate 2m;";
          };
          "later.test" = tls // {
            listenAddresses = primary;
            root = "${sites}/later";
          };
          "xn--bcher-kva.test" = tls // {
            listenAddresses = primary;
            root = "${sites}/idn";
          };
          "blocked.test" = tls // {
            listenAddresses = [
              blocked4
              "[${blocked6}]"
            ];
            root = "${sites}/blocked";
          };
          metadata = {
            listen = [
              {
                addr = metadata4;
                port = 80;
              }
            ];
            root = "${sites}/metadata";
          };
        };
      };

      systemd.services.udp-sink = {
        description = "Records every UDP datagram sent to port 9999";
        wantedBy = [ "multi-user.target" ];
        serviceConfig = {
          ExecStart = "${pkgs.socat}/bin/socat -u UDP6-RECV:9999,ipv6only=0 OPEN:/var/lib/udp-sink/received,creat,append";
          StateDirectory = "udp-sink";
        };
      };
    };

  nodes.agent =
    { nodes, pkgs, ... }:
    {
      imports = [ module ];

      virtualisation.memorySize = 2048;
      virtualisation.cores = 2;

      networking.firewall.enable = true;
      networking.nftables.enable = firewallBackend == "nftables";
      networking.nameservers = [ nodes.internet.networking.primaryIPAddress ];
      services.resolved.enable = true;
      networking.interfaces.eth1.ipv4.routes = [
        {
          address = metadata4;
          prefixLength = 32;
        }
      ];
      environment.systemPackages = [
        pkgs.curl
        pkgs.socat
      ];

      services.agentEgress = {
        enable = true;
        allow.domains = [
          "allowed.test"
          "bücher.test"
        ];
        block.domains = [ "blocked.test" ];
        agents.tester.units = [
          "agent-probe@"
          "agent-download"
          "agent-idle"
        ];
        agents.tester.rules = [
          {
            name = "curl-only";
            domains = [ "proc.test" ];
            process = [ "*/curl" ];
            outbound = "direct";
          }
          {
            name = "git-started";
            domains = [ "git.test" ];
            ancestor = [ "*/git" ];
            outbound = "direct";
          }
          {
            # No binary has this hash: curl is refused by the pin alone.
            name = "pinned-curl";
            domains = [ "pinned.test" ];
            process = [ "*/curl" ];
            exe_sha256 = [ "0000000000000000000000000000000000000000000000000000000000000000" ];
            outbound = "direct";
          }
          {
            # The supervisor (below) answers: pypi.org yes, anything else no.
            name = "ask-supervisor";
            domains = [
              "pypi.org"
              "paste.test"
            ];
            outbound = "ask";
          }
          {
            name = "python-by-address";
            ips = [ "${nodes.internet.networking.primaryIPAddress}/32" ];
            ports = [ 80 ];
            process = [ "*/python3*" ];
            outbound = "direct";
          }
        ];
        # The README's example supervisor, as nix/example-configuration.nix
        # has it, on the control socket.
        control.enable = true;
        control.supervisors.by-host =
          (import ../nix/example-configuration.nix { inherit pkgs; }).services.agentEgress.control.supervisors.by-host;
        settings.ask.timeout_ms = 15000;
        # A local SOCKS proxy is an exit only where a rule names it.
        settings.loopback.allow = [
          {
            name = "named-socks";
            ports = [ 1081 ];
            listeners = [ "named-socks.service" ];
          }
        ];
      };
      # Two SOCKS proxies on the host's loopback, outside the agents.
      systemd.services.local-socks = {
        wantedBy = [ "multi-user.target" ];
        serviceConfig.ExecStart = "${pkgs.microsocks}/bin/microsocks -i 127.0.0.1 -p 1080";
      };
      systemd.services.named-socks = {
        wantedBy = [ "multi-user.target" ];
        serviceConfig.ExecStart = "${pkgs.microsocks}/bin/microsocks -i 127.0.0.1 -p 1081";
      };
      specialisation.wider.configuration = {
        services.agentEgress.allow.domains = [ "later.test" ];
      };

      users.users.agent.isNormalUser = true;
      systemd.tmpfiles.rules = [ "d ${probeDir} 1777 root root -" ];

      systemd.services."agent-probe@" = {
        description = "agent-egress test agent, probe %i";
        path = [
          pkgs.coreutils
          pkgs.curl
          pkgs.chromium
          pkgs.dnsutils
          pkgs.getent
          pkgs.git
          pkgs.python3
          pkgs.socat
        ];
        serviceConfig = {
          Type = "oneshot";
          User = "agent";
          ExecStart = "${probe} %i";
        };
      };
      systemd.services.agent-download = {
        description = "agent-egress test agent, a long download";
        path = [ pkgs.curl ];
        script = ''
          curl --silent --show-error --max-time 120 --cacert ${testCA}/ca.crt \
            --output ${probeDir}/big --write-out '%{http_code} %{size_download}' \
            https://allowed.test/big > ${probeDir}/download.result
        '';
        serviceConfig = {
          Type = "oneshot";
          User = "agent";
        };
      };
      systemd.services.agent-idle = {
        description = "agent-egress test agent, idle";
        serviceConfig = {
          User = "agent";
          ExecStart = "${pkgs.coreutils}/bin/sleep infinity";
        };
      };
    };

  testScript =
    { nodes, ... }:
    let
      egress = nodes.agent.services.agentEgress;
    in
    ''
      CA = "${testCA}/ca.crt"
      INTERNET4 = "${nodes.internet.networking.primaryIPAddress}"
      INTERNET6 = "${nodes.internet.networking.primaryIPv6Address}"
      AGENT6 = "${nodes.agent.networking.primaryIPv6Address}"
      BLOCKED4 = "${blocked4}"
      BLOCKED6 = "${blocked6}"
      METADATA4 = "${metadata4}"
      TABLE = "${egress.settings.interception.table}"
      TESTER_SLICE = "${egress.agents.tester.slice}"
      AUDIT = "${egress.settings.audit.path}"
      FIREWALL_BACKEND = "${firewallBackend}"
      TOPLEVEL = "${nodes.agent.system.build.toplevel}"
      SPECIALISATION = "wider"
      DNS_BURST = "${./dns-burst.py}"
    ''
    + builtins.readFile ./script.py;
}
