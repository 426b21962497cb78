# The VM test's scenarios, one subtest each (the names are
# vm-tests/scenarios.txt, shared with the e2e suite). agent-egress.nix
# prepends the constants: CA, INTERNET4/6, BLOCKED4/6, METADATA4, AGENT6,
# TABLE, TESTER_SLICE, AUDIT, FIREWALL_BACKEND, TOPLEVEL, SPECIALISATION,
# DNS_BURST.
# SPDX-License-Identifier: GPL-3.0-or-later

import base64
import json
import re
import shlex
import time

PROBE_DIR = "/run/agent-probe"
NGINX_LOG = "/var/log/nginx/probe.log"
CHROMIUM = (
    "chromium --headless=new --no-sandbox --disable-gpu --no-first-run"
    " --disable-background-networking --disable-component-update --disable-sync"
    " --ignore-certificate-errors --virtual-time-budget=10000"
)
# A refused connection must fail at once, not after a timeout.
FAST_MS = 2000

probe_serial = 0


class Probe:
    def __init__(self, rc: int, out: str, pid: int, ms: int):
        self.rc, self.out, self.pid, self.ms = rc, out, pid, ms


def in_agent(script: str, instance: str = "") -> Probe:
    """Runs a shell script as the test agent, in a fresh instance of agent-probe@.service."""
    global probe_serial
    probe_serial += 1
    name = instance or str(probe_serial)
    encoded = base64.b64encode(script.encode()).decode()
    agent.succeed(f"echo {encoded} | base64 -d > {PROBE_DIR}/{name}.cmd")
    agent.succeed(f"systemctl start agent-probe@{name}.service")

    def read(suffix: str) -> str:
        return agent.succeed(f"cat {PROBE_DIR}/{name}.{suffix}")

    return Probe(int(read("rc")), read("out"), int(read("pid")), int(read("ms")))


def fetch(url: str, options: str = "") -> Probe:
    return in_agent(f"exec curl --silent --show-error --max-time 10 --cacert {CA} {options} '{url}'")


def expect_page(url: str, marker: str, options: str = "") -> Probe:
    probe = fetch(url, options)
    assert probe.rc == 0 and marker in probe.out, f"{url}: expected {marker!r}, got rc {probe.rc}: {probe.out}"
    return probe


def expect_refused(url: str, options: str = "") -> Probe:
    probe = fetch(url, options)
    assert probe.rc != 0, f"{url} was reachable from the agent: {probe.out}"
    assert probe.ms < FAST_MS, f"{url} took {probe.ms} ms to fail: refusals must be fast"
    return probe


def served(canary: str, server: str = "") -> list[str]:
    """The internet's nginx log lines for requests holding canary, at server (an address) if given."""
    lines = internet.succeed(f"cat {NGINX_LOG} || true").splitlines()
    return [line for line in lines if canary in line and (not server or line.split()[0] == server)]


def audit_records() -> list[dict]:
    text = agent.succeed(f"cat {AUDIT} 2>/dev/null || true")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def wait_for_audit(what: str, **fields) -> dict:
    """The first audit record with all these fields, waiting for the connection to end
    (or of another event: event="dns" for a query)."""
    fields.setdefault("event", "end")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for record in audit_records():
            if all(record.get(key) == value for key, value in fields.items()):
                return record
        time.sleep(0.5)
    raise AssertionError(f"no audit record {what} ({fields}); last: {audit_records()[-5:]}")


def wait_for_daemon() -> None:
    agent.wait_for_unit("agent-egress.service")
    agent.wait_until_succeeds(f"nft list set inet {TABLE} agents")


def in_slice(command: str) -> tuple[int, str]:
    """Runs a command as the agent user in a scope of the tester's slice (not bound to the daemon)."""
    timed = f"s=$(date +%s%N); {command}; rc=$?; echo elapsed_ms=$(( ($(date +%s%N) - s) / 1000000 )); exit $rc"
    return agent.execute(
        f"systemd-run --scope --quiet --uid=agent --slice={TESTER_SLICE} -- bash -c {shlex.quote(timed)}"
    )


def elapsed_ms(output: str) -> int:
    match = re.search(r"elapsed_ms=(\d+)", output)
    assert match, output
    return int(match.group(1))


def restore_firewall() -> None:
    unit = "nftables.service" if FIREWALL_BACKEND == "nftables" else "firewall.service"
    agent.succeed(f"systemctl restart {unit}")


start_all()
internet.wait_for_unit("nginx.service")
internet.wait_for_unit("dnsmasq.service")
internet.wait_for_unit("udp-sink.service")
agent.wait_for_unit("multi-user.target")
wait_for_daemon()

with subtest("allowed_https"):
    # The firewall is on and checks reverse paths; our exception is in place.
    if FIREWALL_BACKEND == "nftables":
        agent.succeed("nft list chain inet nixos-fw rpfilter")
        agent.succeed("nft list chain inet nixos-fw rpfilter-allow | grep -q 'meta mark'")
    else:
        agent.succeed("iptables -t mangle -S nixos-fw-rpfilter | grep -q -- '-i lo -m mark --mark'")
    # Names resolve under RestrictNetworkInterfaces=lo both ways a program may
    # ask: glibc (its own files and dns: nscd's socket and resolved's varlink
    # API are hidden from agent units) and a DNS client of its own (127.0.0.53
    # on lo); both answered by the daemon's handler, under the policy.
    probe = in_agent("getent hosts allowed.test && dig +short +time=2 +tries=1 @127.0.0.53 allowed.test")
    assert probe.rc == 0 and probe.out.count(INTERNET4) >= 1, probe.out
    expect_page("https://allowed.test/?c=allowed_https", "allowed-site-marker")
    wait_for_audit("for the allowed HTTPS request", host="allowed.test", rule="allow", outbound="direct")

with subtest("allowed_http"):
    expect_page("http://allowed.test/?c=allowed_http", "allowed-site-marker")
    assert served("c=allowed_http", INTERNET4), "the HTTP request did not reach the allowed server"

with subtest("allowed_ipv6"):
    expect_page("https://allowed.test/?c=allowed_ipv6", "allowed-site-marker", "--ipv6")
    lines = served("c=allowed_ipv6", INTERNET6)
    assert lines and lines[0].split()[1] == AGENT6, f"expected a request from {AGENT6}: {lines}"

with subtest("blocked_fails_fast"):
    expect_refused("https://blocked.test/?c=blocked_fails_fast")
    expect_refused("http://blocked.test/?c=blocked_fails_fast")
    expect_refused("https://later.test/?c=blocked_fails_fast")
    assert not served("c=blocked_fails_fast"), "a blocked request reached a server"
    # Its name does not resolve: the agents' DNS is answered under the policy.
    wait_for_audit("for the blocked name", event="dns", host="blocked.test", rule="block", outbound="block")

with subtest("name_spelling"):
    expect_page("http://ALLOWED.Test./?c=name_spelling", "allowed-site-marker")
    expect_page("https://AlLoWeD.tEsT./?c=name_spelling", "allowed-site-marker")
    # The allow list says bücher.test; the wire says xn--bcher-kva.test.
    expect_page("http://xn--bcher-kva.test/?c=name_spelling", "idn-site-marker")
    expect_refused("http://BLOCKED.test./?c=name_spelling_blocked")
    expect_refused("https://Blocked.TEST./?c=name_spelling_blocked")
    assert not served("c=name_spelling_blocked")

with subtest("sni_spoofing"):
    # An allowed name in the SNI or Host header, aimed at the blocked server's
    # address: whatever the agent gets, it is not the blocked server.
    probe = fetch("https://allowed.test/?c=sni_spoofing", f"--resolve allowed.test:443:{BLOCKED4}")
    assert "blocked-site-marker" not in probe.out, probe.out
    probe = fetch(f"http://{BLOCKED4}/?c=sni_spoofing", "--header 'Host: allowed.test'")
    assert "blocked-site-marker" not in probe.out, probe.out
    probe = fetch("https://allowed.test/?c=sni_spoofing", f"--resolve allowed.test:443:[{BLOCKED6}]")
    assert "blocked-site-marker" not in probe.out, probe.out
    assert not served("c=sni_spoofing", BLOCKED4) and not served("c=sni_spoofing", BLOCKED6)
    # And the other way round: a blocked name stays blocked at an allowed address.
    expect_refused("https://blocked.test/?c=sni_spoofing_reverse", f"--insecure --resolve blocked.test:443:{INTERNET4}")
    assert not served("c=sni_spoofing_reverse")

with subtest("ip_literal"):
    # No name, so only IP rules apply, and none allows these.
    expect_refused(f"https://{INTERNET4}/?c=ip_literal", "--insecure")
    expect_refused(f"http://{INTERNET4}/?c=ip_literal")
    expect_refused(f"http://[{INTERNET6}]/?c=ip_literal")
    assert not served("c=ip_literal")

with subtest("metadata_blocked"):
    expect_refused(f"http://{METADATA4}/?c=metadata_blocked")
    # The service answers anyone outside the agents' slice.
    agent.succeed(f"curl --silent --max-time 5 http://{METADATA4}/?c=metadata_control | grep -q metadata-marker")
    assert not served("c=metadata_blocked")

with subtest("udp_dropped"):
    in_agent(
        f"printf udp-canary-4 | socat -u - UDP4-SENDTO:{INTERNET4}:9999;"
        f" printf udp-canary-6 | socat -u - UDP6-SENDTO:[{INTERNET6}]:9999;"
        f" dig +time=2 +tries=1 @{INTERNET4} udp-canary.test; true"
    )
    # The same datagram from outside the slice arrives: the sink works.
    agent.succeed(f"printf udp-control | socat -u - UDP4-SENDTO:{INTERNET4}:9999")
    internet.wait_until_succeeds("grep -q udp-control /var/lib/udp-sink/received")
    internet.fail("grep -q udp-canary /var/lib/udp-sink/received")
    internet.fail("journalctl -u dnsmasq.service | grep -q udp-canary.test")

with subtest("audit_names_process"):
    probe = expect_page("https://allowed.test/?c=audit_names_process", "allowed-site-marker")
    record = wait_for_audit("naming the curl process", pid=probe.pid, host="allowed.test")
    assert record["exe"].endswith("/curl"), record
    assert "agent-egress-agents-tester.slice" in record["agent"], record
    assert (record["rule"], record["outbound"]) == ("allow", "direct"), record
    assert record["bytes_up"] > 0 and record["bytes_down"] > 0, record
    assert not record.get("error"), record
    for key in ["ts", "src", "dst", "proto", "duration_ms"]:
        assert key in record, f"{key} missing: {record}"
    # Lineage: the curl a shell started lists that shell among its ancestors.
    in_agent(f"sh -c 'curl --silent --max-time 10 --cacert {CA} https://allowed.test/?c=lineage; true' lineage-shell")
    agent.wait_until_succeeds(f"grep -q 'c=lineage' {AUDIT}")
    lineage = next(r for r in audit_records() if "c=lineage" in json.dumps(r.get("cmdline")) and r["event"] == "end")
    assert any(a["cmdline"][-1:] == ["lineage-shell"] for a in lineage["ancestry"]), lineage

with subtest("agent_restart_captured"):
    # Each start of a unit makes a new cgroup, with a new id; systemd adds it
    # to the set (NFTSet=) and the capture follows.
    ids = []
    for _ in range(2):
        probe = in_agent(
            "stat -c %i /sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup);"
            f" curl --silent --show-error --max-time 10 --cacert {CA} 'https://allowed.test/?c=agent_restart_captured' &"
            " echo curl_pid=$!; wait $!",
            instance="restarted",
        )
        assert probe.rc == 0 and "allowed-site-marker" in probe.out, probe.out
        ids.append(probe.out.split()[0])
        match = re.search(r"curl_pid=(\d+)", probe.out)
        assert match, probe.out
        wait_for_audit("for the restarted agent", pid=int(match.group(1)), host="allowed.test")
    assert ids[0] != ids[1], f"the restarted unit kept cgroup id {ids[0]}"
    expect_refused("https://blocked.test/?c=agent_restart_captured")

with subtest("ruleset_flush_reinstalled"):
    agent.succeed("nft flush ruleset")
    # At once, before any reinstall: still no way out.
    expect_refused("https://blocked.test/?c=ruleset_flush_reinstalled")
    agent.wait_until_succeeds(f"nft list set inet {TABLE} agents", timeout=10)
    expect_page("https://allowed.test/?c=ruleset_flush_reinstalled", "allowed-site-marker")
    expect_refused("https://blocked.test/?c=ruleset_flush_reinstalled")
    restore_firewall()
    agent.wait_until_succeeds(f"nft list set inet {TABLE} agents", timeout=10)
    expect_page("https://allowed.test/?c=ruleset_flush_reinstalled", "allowed-site-marker")
    expect_refused("https://blocked.test/?c=ruleset_flush_reinstalled")
    assert not served("c=ruleset_flush_reinstalled", BLOCKED4)

with subtest("proxy_killed_fails_closed"):
    # No restart for this once, so that the kernel state outlives the proxy.
    agent.succeed(
        "mkdir -p /run/systemd/system/agent-egress.service.d"
        " && printf '[Service]\\nRestart=no\\n' > /run/systemd/system/agent-egress.service.d/no-restart.conf"
        " && systemctl daemon-reload"
    )
    agent.succeed("systemctl start agent-idle.service")
    agent.succeed("systemctl kill --signal=SIGKILL agent-egress.service")
    agent.wait_until_fails("systemctl is-active agent-egress.service")
    agent.succeed(f"nft list set inet {TABLE} agents")
    status, out = in_slice(
        f"curl --silent --show-error --max-time 10 --cacert {CA} 'https://allowed.test/?c=proxy_killed_fails_closed'"
    )
    assert status != 0, f"the agent got out with the proxy dead: {out}"
    assert elapsed_ms(out) < FAST_MS, f"with the proxy dead, connections must be refused at once: {out}"
    assert not served("c=proxy_killed_fails_closed")
    # The agent units bound to the daemon went down with it.
    agent.wait_until_fails("systemctl is-active agent-idle.service")
    agent.succeed(
        "rm /run/systemd/system/agent-egress.service.d/no-restart.conf"
        " && systemctl daemon-reload && systemctl reset-failed agent-egress.service"
        " && systemctl start agent-egress.service"
    )
    wait_for_daemon()
    expect_page("https://allowed.test/?c=proxy_killed_fails_closed_after", "allowed-site-marker")

with subtest("daemon_stop_takes_agents_down"):
    agent.succeed("systemctl start agent-idle.service")
    agent.succeed("systemctl stop agent-egress.service")
    agent.wait_until_fails("systemctl is-active agent-idle.service")
    # A graceful stop leaves the agents locked out.
    agent.succeed(f"nft list set inet {TABLE} agents")
    status, out = in_slice(
        f"curl --silent --show-error --max-time 10 --cacert {CA} 'https://allowed.test/?c=daemon_stop_takes_agents_down'"
    )
    assert status != 0 and elapsed_ms(out) < FAST_MS, out
    assert not served("c=daemon_stop_takes_agents_down")
    agent.succeed("systemctl start agent-egress.service")
    wait_for_daemon()
    agent.succeed("systemctl start agent-idle.service")
    expect_page("https://allowed.test/?c=daemon_stop_takes_agents_down_after", "allowed-site-marker")

with subtest("reload_keeps_connections"):
    main_pid = agent.succeed("systemctl show --property=MainPID --value agent-egress.service").strip()
    expect_refused("https://later.test/?c=reload_keeps_connections_before")
    # A 20 MiB download at 2 MiB/s is under way while the configuration changes.
    agent.succeed(f"rm -f {PROBE_DIR}/big {PROBE_DIR}/download.result")
    agent.succeed("systemctl start --no-block agent-download.service")
    agent.wait_until_succeeds(f"test $(stat -c %s {PROBE_DIR}/big 2>/dev/null || echo 0) -gt 1048576")
    agent.succeed(f"{TOPLEVEL}/specialisation/{SPECIALISATION}/bin/switch-to-configuration test")
    assert agent.succeed("systemctl show --property=MainPID --value agent-egress.service").strip() == main_pid, (
        "the config change restarted the daemon instead of reloading it"
    )
    expect_page("https://later.test/?c=reload_keeps_connections_after", "later-site-marker")
    agent.wait_until_succeeds(
        "systemctl show --property=ActiveState --value agent-download.service | grep -qx -e inactive -e failed",
        timeout=60,
    )
    result = agent.succeed(f"cat {PROBE_DIR}/download.result").split()
    assert result == ["200", str(20 * 1024 * 1024)], f"the download was cut: {result}"
    assert agent.succeed("systemctl show --property=Result --value agent-download.service").strip() == "success"
    agent.succeed(f"{TOPLEVEL}/bin/switch-to-configuration test")
    expect_refused("https://later.test/?c=reload_keeps_connections_back")

with subtest("chromium_allowed_page_blocked_subresource"):
    probe = in_agent(f"exec {CHROMIUM} --user-data-dir=$HOME/chromium --dump-dom https://allowed.test/page.html")
    assert "allowed-page-marker" in probe.out, probe.out
    assert "subresource-blocked" in probe.out, probe.out
    assert not served("pixel.png", BLOCKED4) and not served("pixel.png", BLOCKED6)
    wait_for_audit("for the blocked subresource", event="dns", host="blocked.test", outbound="block")

with subtest("chromium_quic_fallback"):
    # Count the agent's QUIC attempts before anything can drop them.
    agent.succeed(
        "nft add table inet quic_attempts"
        " && nft 'add chain inet quic_attempts output { type filter hook output priority -400; }'"
        " && nft add rule inet quic_attempts output udp dport 443 counter"
    )
    # The first visit learns Alt-Svc h3; the second, from the same profile,
    # tries QUIC (UDP, dropped) and must fall back to TCP.
    profile = f"{PROBE_DIR}/chromium-quic"
    for _ in range(2):
        probe = in_agent(f"exec {CHROMIUM} --enable-quic --user-data-dir={profile} --dump-dom https://allowed.test/quic.html")
        assert "quic-page-marker" in probe.out, probe.out
    counter = agent.succeed("nft list chain inet quic_attempts output")
    match = re.search(r"packets (\d+)", counter)
    assert match and int(match.group(1)) > 0, f"Chromium never tried QUIC: {counter}"
    agent.succeed("nft delete table inet quic_attempts")
    assert not [line for line in served("quic.html") if line.endswith("HTTP/3.0")], "a QUIC request got through"

with subtest("chromium_ech_stripped"):
    # allowed.test's HTTPS record carries an ECH config whose public name is
    # public.test: Chromium gets the record without it, so the name in the
    # clear, which the proxy decides on, is allowed.test. (The e2e scenario
    # also runs the control: with strip_ech off, Chromium sends public.test.)
    seen = len(audit_records())
    probe = in_agent(
        f"exec {CHROMIUM} --enable-features=AsyncDns,UseDnsHttpsSvcb,EncryptedClientHello"
        " --user-data-dir=$HOME/chromium-ech --dump-dom https://allowed.test/"
    )
    assert "allowed-site-marker" in probe.out, probe.out
    deadline = time.monotonic() + 20
    while True:
        new = audit_records()[seen:]
        https = [r for r in new if r.get("event") == "dns" and r.get("host") == "allowed.test" and r.get("qtype") == "HTTPS"]
        pages = [r for r in new if r.get("event") == "end" and r.get("host") == "allowed.test" and r.get("bytes_down", 0) > 0]
        if (https and pages) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert https and all("ech taken out" in json.dumps(r["answers"]) for r in https), f"Chromium's HTTPS query: {https}"
    assert pages and all(r["sni"] == "allowed.test" for r in pages), f"the page's connections: {pages}"
    assert not [r for r in new if r.get("sni") == "public.test"], f"the ECH public name in the clear: {new}"

with subtest("kernel_backstop"):
    # Table gone and daemon frozen: only RestrictNetworkInterfaces=lo is left.
    agent.succeed("systemctl kill --signal=SIGSTOP agent-egress.service")
    agent.succeed(f"nft delete table inet {TABLE}")
    probe = fetch("https://allowed.test/?c=kernel_backstop", "--max-time 5")
    assert probe.rc != 0, f"the agent got out with no table: {probe.out}"
    probe = fetch(f"http://{BLOCKED4}/?c=kernel_backstop", "--max-time 5")
    assert probe.rc != 0, f"the agent got out with no table: {probe.out}"
    assert not served("c=kernel_backstop")
    agent.succeed("systemctl kill --signal=SIGCONT agent-egress.service")
    agent.wait_until_succeeds(f"nft list set inet {TABLE} agents", timeout=10)
    expect_page("https://allowed.test/?c=kernel_backstop_after", "allowed-site-marker")

with subtest("interface_bound_dropped"):
    # A socket bound to eth1 ignores the route that takes marked packets to lo.
    # Dropped, not refused: the agent waits for its own timeout.
    for url in [f"http://{BLOCKED4}/?c=interface_bound", f"http://[{BLOCKED6}]/?c=interface_bound"]:
        probe = fetch(url, "--interface eth1 --max-time 3")
        assert probe.rc != 0, f"{url} through eth1 was reachable: {probe.out}"
    assert not served("c=interface_bound")

with subtest("closed_flows_stay_captured"):
    # Connects to the refused host, each cut off within milliseconds: the
    # kernel's ACKs and resets for those flows must stay captured too.
    internet.succeed(
        "nft add table inet arrivals"
        " && nft add chain inet arrivals input '{ type filter hook input priority 0; }'"
        f" && nft add rule inet arrivals input ip daddr {BLOCKED4} tcp dport 80 counter"
        f" && nft add rule inet arrivals input ip6 daddr {BLOCKED6} tcp dport 80 counter"
    )
    cut_off = "for i in $(seq 100); do timeout 0.0$((i % 3 + 1)) bash -c 'exec 3<>/dev/tcp/{}/80' 2>/dev/null; done"
    in_agent(f"{cut_off.format(BLOCKED4)}; {cut_off.format(BLOCKED6)}; sleep 1; true")
    arrived = internet.succeed("nft list table inet arrivals")
    internet.succeed("nft delete table inet arrivals")
    assert not re.search(r"packets [1-9]", arrived), f"packets of closed agent flows reached the refused host: {arrived}"

with subtest("rebinding_refused"):
    # Allowed names that resolve to the metadata endpoint or a private address:
    # the proxy dials neither.
    for name in ["rebind-md.allowed.test", "rebind-pv.allowed.test"]:
        probe = fetch(f"http://{name}/?c=rebinding", "--include")
        assert probe.out.startswith("HTTP/1.1 403"), f"{name}: {probe.out}"
        record = wait_for_audit(name, host=name)
        assert record["dial"] in ("refused_private", "refused_ip_rule"), record
    assert not served("c=rebinding")

with subtest("keep_alive_hosts_decided"):
    # curl reuses its connection to allowed.test for the second URL, whose Host
    # header names blocked.test: that request is refused on the open connection.
    probe = in_agent(
        "exec curl --silent --output /dev/null --write-out '%{http_code}\\n' 'http://allowed.test/?c=keepalive-1'"
        " --next --silent --output /dev/null --write-out '%{http_code}\\n' --header 'Host: blocked.test'"
        " 'http://allowed.test/?c=keepalive-2'"
    )
    assert probe.out.split() == ["200", "403"], probe.out
    assert not served("c=keepalive-2")

with subtest("loopback_decided"):
    agent.wait_for_open_port(1080)
    agent.wait_for_open_port(1081)
    # The exit is real: from outside the agents the SOCKS proxy reaches the refused host.
    agent.succeed(f"curl --silent --max-time 10 --socks5 127.0.0.1:1080 'http://{BLOCKED4}/?c=lo-control'")
    assert served("c=lo-control")
    # From an agent unit: refused (also spelt ::ffff:127.0.0.1), and nothing arrives.
    for proxy in ["127.0.0.1:1080", "[::ffff:127.0.0.1]:1080"]:
        expect_refused(f"http://{BLOCKED4}/?c=lo-socks", f"--socks5 '{proxy}'")
    record = wait_for_audit("the refused SOCKS proxy", dst="127.0.0.1:1080")
    assert record["verdict"] == "block" and record["rule"] == "loopback:default", record
    assert record["listener"].endswith("local-socks.service"), record
    assert not served("c=lo-socks")
    # The proxy a loopback rule names (port and unit) is reachable.
    expect_page(f"http://{BLOCKED4}/?c=lo-named", "blocked-site-marker", "--socks5 127.0.0.1:1081")
    record = wait_for_audit("the named SOCKS proxy", dst="127.0.0.1:1081")
    assert record["verdict"] == "allow" and record["rule"] == "named-socks", record
    # The agent's own listener, in its own unit, on 127.0.0.1 and ::1.
    for bind, url in [("127.0.0.1", "http://127.0.0.1:8765/"), ("::1", "http://[::1]:8765/")]:
        probe = in_agent(
            f"python3 -m http.server --bind {bind} 8765 & server=$!;"
            f" for i in $(seq 50); do curl --silent --output /dev/null '{url}' && break; sleep 0.1; done;"
            f" curl --silent --output /dev/null --write-out '%{{http_code}}' '{url}'; kill $server"
        )
        assert probe.out.strip().endswith("200"), probe.out
    record = wait_for_audit("the agent's own listener", rule="loopback:own")
    assert record["verdict"] == "allow", record

with subtest("repairs_leak_nothing"):
    # An agent connecting to a refused address in a tight loop while the table is
    # flushed and deleted: the daemon repairs it, and nothing reaches the address.
    script = (
        "end=$((SECONDS + 8)); n=0; while [ $SECONDS -lt $end ]; do"
        f" curl --silent --output /dev/null --max-time 1 'http://{BLOCKED4}/?c=repair'; n=$((n + 1)); done; echo $n"
    )
    encoded = base64.b64encode(script.encode()).decode()
    agent.succeed(f"echo {encoded} | base64 -d > {PROBE_DIR}/hammer.cmd")
    agent.succeed("systemctl start --no-block agent-probe@hammer.service")
    agent.wait_until_succeeds(f"test -e {PROBE_DIR}/hammer.pid")
    for repair in ["nft flush ruleset", f"nft delete table inet {TABLE}"]:
        time.sleep(1)
        agent.succeed(repair)
        wait_for_daemon()
    agent.wait_until_succeeds(f"test -e {PROBE_DIR}/hammer.rc", timeout=30)
    assert int(agent.succeed(f"cat {PROBE_DIR}/hammer.out").split()[-1]) >= 10
    assert not served("c=repair"), "a connect during a repair reached the refused host"
    restore_firewall()

with subtest("delegated_subtree_captured"):
    # A subtree delegated to the agent user as systemd hands user@UID.service
    # over (Delegate=yes), the agent's cgroup inside it. The module's daemon
    # makes way for one whose config names that cgroup (same table, mark and port).
    subtree = "/sys/fs/cgroup/agent-egress-delegated"
    agent.succeed("systemctl stop agent-egress.service")
    agent.succeed(
        f"mkdir {subtree} {subtree}/agent && chown agent:users {subtree}"
        f" {subtree}/cgroup.procs {subtree}/cgroup.threads {subtree}/cgroup.subtree_control"
    )
    delegated_audit = f"{PROBE_DIR}/delegated-audit.jsonl"

    def delegated_config(handling: str) -> str:
        path = f"{PROBE_DIR}/delegated-{handling}.json"
        config = {
            "interception": {"cgroups": ["agent-egress-delegated/agent"], "delegated_subtrees": handling},
            "dns": {"servers": [INTERNET4]},
            "rules": [{"name": "allowed", "domains": ["allowed.test"], "outbound": "direct"}],
            "default": "block",
            "audit": {"path": delegated_audit},
        }
        agent.succeed(f"echo {shlex.quote(json.dumps(config))} > {path}")
        return path

    def escape(handling: str) -> str:
        """As the agent user in the agent's cgroup: make a sibling cgroup, move there, ask for blocked.test."""
        agent.succeed(
            f"systemd-run --unit=delegated-egress-{handling} -p Type=notify"
            f" $(command -v agent-egress) run --config {delegated_config(handling)}"
        )
        name = f"escape-{handling}"
        script = (
            f"mkdir {subtree}/{name} && echo $$ > {subtree}/{name}/cgroup.procs"
            f" && grep -qx 0::/agent-egress-delegated/{name} /proc/self/cgroup"
            " && curl --silent --output /dev/null --write-out '%{http_code}' --max-time 5"
            f" --resolve blocked.test:80:{BLOCKED4} 'http://blocked.test/?c=delegated_{handling}'"
        )
        status, out = agent.execute(
            f"sh -c 'echo $$ > {subtree}/agent/cgroup.procs"
            " && exec setpriv --reuid=agent --regid=users --clear-groups sh -c \"$0\"'"
            f" {shlex.quote(script)}"
        )
        agent.succeed(f"systemctl stop delegated-egress-{handling}.service")
        return out.strip()

    # refuse: no start, and the reason.
    status, out = agent.execute(f"agent-egress run --config {delegated_config('refuse')} 2>&1")
    assert status != 0, out
    assert "agent-egress-delegated/agent lies in the delegated subtree agent-egress-delegated" in out, out
    assert "writable by uid" in out and '"capture"' in out, out
    # ignore (the control): the move is a way out.
    assert escape("ignore") == "200"
    assert served("c=delegated_ignore", BLOCKED4), "the control's escapee did not reach blocked.test"
    # capture (the default): the escapee's connection is still the agent's, and refused.
    assert escape("capture") == "403"
    assert not served("c=delegated_capture")
    records = [json.loads(line) for line in agent.succeed(f"cat {delegated_audit}").splitlines() if line.strip()]
    escaped = [r for r in records if r.get("subtree") == "agent-egress-delegated" and r.get("host") == "blocked.test"]
    assert escaped, f"no record of the escapee's request: {records[-5:]}"
    assert escaped[0]["agent"] == "agent-egress-delegated/agent" and escaped[0]["verdict"] == "block", escaped[0]
    agent.succeed(f"agent-egress down --config {PROBE_DIR}/delegated-capture.json")
    agent.succeed(f"find {subtree} -depth -type d -exec rmdir {{}} +")
    agent.succeed("systemctl start agent-egress.service")
    wait_for_daemon()


with subtest("dns_decided"):
    # Every query of an agent is answered by the daemon's handler under the
    # policy, whichever resolver it asks: refused names leave nothing behind.
    probe = in_agent(f"dig +short +time=2 +tries=1 @{INTERNET4} allowed.test")
    assert INTERNET4 in probe.out, probe.out
    for server in [INTERNET4, "127.0.0.53", "203.0.113.53"]:
        probe = in_agent(f"dig +time=2 +tries=1 @{server} c2VjcmV0.blocked.test")
        assert "status: NXDOMAIN" in probe.out, f"via {server}: {probe.out}"
    probe = in_agent(f"dig +time=2 +tries=1 @{INTERNET4} allowed.test TXT")
    assert "status: REFUSED" in probe.out, probe.out
    internet.fail("journalctl -u dnsmasq.service | grep -qi c2vjcmv0")
    wait_for_audit("the refused name", event="dns", host="c2vjcmv0.blocked.test", rcode="NXDOMAIN")

with subtest("dns_handler_down_leaks_nothing"):
    # The handler not answering (the daemon frozen): no answer, and nothing
    # reaches a resolver from the agent.
    agent.succeed("systemctl kill --signal=SIGSTOP agent-egress.service")
    probe = in_agent("dig +time=1 +tries=1 @127.0.0.53 handler-down.allowed.test; true")
    agent.succeed("systemctl kill --signal=SIGCONT agent-egress.service")
    assert "ANSWER SECTION" not in probe.out, probe.out
    internet.fail("journalctl -u dnsmasq.service | grep -q handler-down")

with subtest("dns_exfiltration_limited"):
    # 1,000 random labels below an allowed domain at once: past the per-agent
    # bounds, REFUSED at once and not forwarded.
    probe = in_agent(f"python3 {DNS_BURST} {INTERNET4}")
    counts = dict(item.split(":") for item in probe.out.split())
    assert int(counts.get("5", 0)) >= 850, probe.out
    wait_for_audit("a rate-limited query", event="dns", rate_limited=True)

with subtest("nameless_by_resolved_name"):
    # A connection that names nothing, to an address the agent resolved:
    # decided under that name.
    in_agent(
        "dig +short +time=2 +tries=1 @127.0.0.53 allowed.test > /dev/null;"
        f" printf 'SSH-2.0-agent\\r\\n\\r\\n' | socat -t 2 - TCP:{INTERNET4}:80,connect-timeout=3; true"
    )
    record = wait_for_audit("the nameless connection", dst=f"{INTERNET4}:80", resolved_name="allowed.test")
    assert record["verdict"] == "allow" and record["host"] == "allowed.test", record

with subtest("ech_stripped"):
    # allowed.test publishes an HTTPS record with an ECH config: the agent
    # gets it without.
    probe = in_agent("dig +time=2 +tries=1 @127.0.0.53 allowed.test HTTPS")
    assert "alpn" in probe.out and "ech=" not in probe.out, probe.out

with subtest("getent_loopback_resolver"):
    # glibc in an agent unit: nscd's and resolved's varlink sockets are hidden,
    # so it asks 127.0.0.53 itself, which the handler answers under the policy.
    probe = in_agent(
        "for s in /run/nscd/socket /run/systemd/resolve/io.systemd.Resolve; do"
        " socat -u OPEN:/dev/null UNIX-CONNECT:$s 2>/dev/null && echo reachable $s; done;"
        " getent hosts blocked.test; echo getent=$?; getent hosts allowed.test"
    )
    assert "reachable" not in probe.out and "getent=2" in probe.out and INTERNET4 in probe.out, probe.out
    wait_for_audit("glibc's lookup of the blocked name", event="dns", host="blocked.test", rcode="NXDOMAIN")

with subtest("dns_over_tcp"):
    # An agent's query over TCP: answered by the handler under the policy.
    probe = in_agent(f"dig +tcp +time=2 +tries=1 @{INTERNET4} allowed.test")
    assert "status: NOERROR" in probe.out and INTERNET4 in probe.out, probe.out
    probe = in_agent("dig +tcp +time=2 +tries=1 @127.0.0.53 x.blocked.test")
    assert "status: NXDOMAIN" in probe.out, probe.out

with subtest("process_rules_decide"):
    # Rules by process (agents.tester.rules): curl reaches proc.test, python3 not.
    probe = in_agent("curl --silent --max-time 10 'http://proc.test/?c=proc_curl'; true")
    record = wait_for_audit("of curl to proc.test", host="proc.test", rule="curl-only")
    assert record["verdict"] == "allow" and record["exe"].endswith("/curl"), record
    assert served("c=proc_curl"), "curl's request did not arrive"
    probe = in_agent(
        "python3 -c \"import urllib.request as u; print(u.urlopen('http://proc.test/?c=proc_python').status)\"; true"
    )
    assert "403" in probe.out, probe.out
    assert not served("c=proc_python"), "python3 reached proc.test"
    record = wait_for_audit("of python3 to proc.test", host="proc.test", verdict="block")
    assert "python3" in record["exe"], record
    # What git started (its http helper) reaches git.test; a shell's curl not.
    probe = in_agent("GIT_TERMINAL_PROMPT=0 git ls-remote http://git.test/process-rules.git; true")
    record = wait_for_audit("of git's helper", host="git.test", rule="git-started")
    assert any(a["exe"] and a["exe"].endswith("/git") for a in record["ancestry"]), record
    probe = in_agent("sh -c \"curl --silent --max-time 10 'http://git.test/?c=proc_shell'; true\"")
    assert not served("c=proc_shell"), "a shell's curl reached git.test"
    # A pin no binary has refuses curl by its hash alone; the record names curl's.
    in_agent("curl --silent --max-time 10 'http://pinned.test/?c=proc_pinned'; true")
    assert not served("c=proc_pinned"), "curl passed a pin of another hash"
    record = wait_for_audit("of curl to pinned.test", host="pinned.test", verdict="block")
    digest = agent.succeed(f"sha256sum {record['exe']}").split()[0]
    assert record["exe_sha256"] == digest, record

with subtest("process_exited_still_matched"):
    # Part of a request, then gone: decided at the sniff timeout, still by its executable.
    client = (
        "import os, socket, time\n"
        f"s = socket.create_connection(('{INTERNET4}', 80))\n"
        "time.sleep(0.3)\n"
        "s.sendall(b'GET /?c=proc_exited HTTP/1.1\\r\\nHo')\n"
        "os._exit(0)\n"
    )
    encoded = base64.b64encode(client.encode()).decode()
    in_agent(f"echo {encoded} | base64 -d > {PROBE_DIR}/exited.py; python3 {PROBE_DIR}/exited.py")
    record = wait_for_audit("of the exited client", rule="python-by-address", sniff="sniff timeout")
    assert record["verdict"] == "allow" and "python3" in record["exe"], record
    # Gone before the daemon could read it (the daemon stopped meanwhile): not matched, and said.
    gone = (
        "import os, socket\n"
        f"s = socket.create_connection(('{INTERNET4}', 80))\n"
        "s.sendall(b'GET /?c=proc_gone HTTP/1.1\\r\\nHost: gone.test\\r\\n\\r\\n')\n"
        "os._exit(0)\n"
    )
    encoded = base64.b64encode(gone.encode()).decode()
    agent.succeed("systemctl kill --signal=SIGSTOP agent-egress.service")
    try:
        in_agent(f"echo {encoded} | base64 -d > {PROBE_DIR}/gone.py; python3 {PROBE_DIR}/gone.py")
    finally:
        agent.succeed("systemctl kill --signal=SIGCONT agent-egress.service")
    record = wait_for_audit("of the vanished client", http_host="gone.test", verdict="block")
    assert "gone" in record["attribution"], record
    assert not served("c=proc_gone"), "the vanished client's request went through"

with subtest("supervisor_answers_questions"):
    # The example supervisor (control.supervisors.by-host) answers the ask
    # rule's questions on the control socket: pypi.org for good, paste.test
    # refused; the agent's curl only waits.
    agent.wait_for_unit("agent-egress-supervisor-by-host.service")
    probe = in_agent("curl --silent --max-time 20 'http://pypi.org/?c=supervised_pypi'; true")
    assert "allowed-site-marker" in probe.out, probe.out
    record = wait_for_audit("of the asked pypi.org", http_host="pypi.org", rule="ask-supervisor")
    asked = record["asked"]
    assert record["verdict"] == "allow" and asked["answer"] == "allow-always", record
    assert asked["by"]["uid"] not in (None, 0), record
    policy = wait_for_audit("the rule the answer added", event="policy", uid=asked["by"]["uid"])
    assert policy["policy"]["action"] == "rule_added", policy
    probe = in_agent("curl --silent --max-time 20 'http://pypi.org/?c=supervised_again'; true")
    assert "allowed-site-marker" in probe.out, probe.out
    record = wait_for_audit("of pypi.org again", http_host="pypi.org", rule=f"asked-{asked['question']}")
    assert "asked" not in record or record["asked"] is None, record
    probe = in_agent("curl --silent --max-time 20 'http://paste.test/?c=supervised_paste'; echo rc=$?")
    assert "rc=0" not in probe.out or "403" in probe.out, probe.out
    assert not served("c=supervised_paste"), "paste.test was reached though the supervisor refused it"
    record = wait_for_audit("of the refused paste.test", http_host="paste.test", verdict="block")
    assert record["asked"]["answer"] == "deny-once", record
