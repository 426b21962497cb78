#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-3.0-or-later
"""Turn bench/run.sh's measurements into the markdown report.

usage: report.py RESULTS.tsv META.json > results.md

RESULTS.tsv has one measurement a line: proxy, round, metric, value.
"""

import json
import statistics
import sys
from collections import defaultdict

PROXIES = [
    "none",
    "v2ray",
    "haproxy",
    "haproxy-nbthread1",
    "haproxy-nbthread1-conntrack",
    "agent-egress",
    "agent-egress-workers1",
]
# A peer is compared at its best: per metric, the better of its variants.
HAPROXY = ["haproxy", "haproxy-nbthread1"]
HIGHER, LOWER = "higher", "lower"

# metric -> (what was measured, unit, which way is better)
METRICS = {
    "tls_bulk_MBps": ("TLS bulk download (curl, 1 GiB over https)", "MB/s", HIGHER),
    "raw_bulk_MBps": ("raw TCP bulk, no name (iperf3 -R)", "MB/s", HIGHER),
    "https_conn_per_s": ("new HTTPS connections (wrk, Connection: close)", "conn/s", HIGHER),
    "http_conn_per_s": ("new plain-HTTP connections (wrk, Connection: close)", "conn/s", HIGHER),
    "latency_p50_ms": ("one connection, TCP+TLS+GET, p50", "ms", LOWER),
    "latency_p99_ms": ("one connection, TCP+TLS+GET, p99", "ms", LOWER),
    "blocked_p50_ms": ("blocked connection fails after, p50", "ms", LOWER),
    "blocked_p99_ms": ("blocked connection fails after, p99", "ms", LOWER),
    "rss_before_MB": ("proxy RSS, fresh, no connection", "MB", LOWER),
    "rss_idle_MB": ("proxy RSS with 2,000 idle TLS connections", "MB", LOWER),
    "kB_per_idle_conn": ("proxy memory per idle TLS connection", "kB", LOWER),
    "held_MB_over_resting": ("proxy RSS over resting with 1,000 connections held on one question (ask)", "MB", LOWER),
    "kB_per_held_conn": ("proxy memory per held connection (ask)", "kB", LOWER),
    "release_all_p50_ms": ("answer to ServerHello, 1,000 held released at once, p50", "ms", LOWER),
    "release_all_p99_ms": ("answer to ServerHello, 1,000 held released at once, p99", "ms", LOWER),
    "release_one_p50_ms": ("answer to ServerHello, one held connection, p50", "ms", LOWER),
    "release_one_p99_ms": ("answer to ServerHello, one held connection, p99", "ms", LOWER),
    "plain_handshake_p50_ms": ("ClientHello to ServerHello, allowed name, p50", "ms", LOWER),
    "plain_handshake_p99_ms": ("ClientHello to ServerHello, allowed name, p99", "ms", LOWER),
    "cpu_us_per_https_conn": ("proxy CPU per new HTTPS connection", "µs", LOWER),
    "cpu_us_per_http_conn": ("proxy CPU per new plain-HTTP connection", "µs", LOWER),
    "cpu_s_per_GB_tls": ("proxy CPU per GB, TLS bulk", "s/GB", LOWER),
    "cpu_s_per_GB_raw": ("proxy CPU per GB, raw TCP bulk", "s/GB", LOWER),
    "dns_repeated_p50_ms": ("DNS query for one name, one at a time, p50", "ms", LOWER),
    "dns_repeated_p99_ms": ("DNS query for one name, one at a time, p99", "ms", LOWER),
    "dns_repeated_qps": ("DNS queries/s for one name, dnsperf, 4 clients, 64 in flight", "q/s", HIGHER),
    "dns_unique_p50_ms": ("DNS query, a new name each, p50", "ms", LOWER),
    "dns_unique_p99_ms": ("DNS query, a new name each, p99", "ms", LOWER),
    "dns_unique_qps": ("DNS queries/s, a new name each, dnsperf, 4 clients, 64 in flight", "q/s", HIGHER),
    "cpu_us_per_dns_query_repeated": ("proxy CPU per DNS query, one name", "µs", LOWER),
    "cpu_us_per_dns_query_unique": ("proxy CPU per DNS query, a new name each", "µs", LOWER),
    "client_cpu_us_per_dns_query_repeated": ("dnsperf's CPU per DNS query, one name", "µs", LOWER),
    "client_cpu_us_per_dns_query_unique": ("dnsperf's CPU per DNS query, a new name each", "µs", LOWER),
    "server_cpu_us_per_dns_query_repeated": ("dnsmasq's CPU per DNS query, one name", "µs", LOWER),
    "server_cpu_us_per_dns_query_unique": ("dnsmasq's CPU per DNS query, a new name each", "µs", LOWER),
    "https_conn_per_s_3_watchers": ("new HTTPS connections, 3 clients on the event stream", "conn/s", HIGHER),
    "https_conn_per_s_after_watchers": ("new HTTPS connections, right after the event-stream run, without", "conn/s", HIGHER),
    "watched_conn_ratio": (
        "HTTPS conn/s with 3 event-stream clients over the mean of the runs just before and after without",
        "×",
        HIGHER,
    ),
    "cpu_us_per_https_conn_3_watchers": ("proxy CPU per new HTTPS connection, 3 clients on the event stream", "µs", LOWER),
    "cpu_us_per_https_conn_after_watchers": ("proxy CPU per new HTTPS connection, right after the event-stream run", "µs", LOWER),
    "syscalls_per_https_conn": ("proxy system calls per new HTTPS connection (strace -c -f)", "calls", LOWER),
    "https_errors": ("wrk socket errors + non-2xx, HTTPS run", "count", LOWER),
    "http_errors": ("wrk socket errors + non-2xx, HTTP run", "count", LOWER),
    "https_errors_3_watchers": ("wrk socket errors + non-2xx, HTTPS run with 3 event-stream clients", "count", LOWER),
    "https_errors_after_watchers": ("wrk socket errors + non-2xx, HTTPS run after the event-stream run", "count", LOWER),
}

RATIOS = [
    ("v2ray", "none"),
    ("haproxy", "none"),
    ("haproxy-nbthread1", "none"),
    ("agent-egress", "none"),
    ("agent-egress", "v2ray"),
    ("agent-egress", "haproxy"),
    ("agent-egress", "haproxy-nbthread1"),
    ("agent-egress-workers1", "haproxy-nbthread1"),
]

AE = "agent-egress"


def best(median, variants, metric):
    """The best of a peer's variants for one metric: (value, which variant)."""
    found = [(median[(v, metric)], v) for v in variants if (v, metric) in median]
    if not found:
        return None, None
    pick = max if METRICS[metric][2] == HIGHER else min
    return pick(found)


def target_checks(median):
    """#16's targets, against haproxy at its best, #14's event-stream cost and #12's DNS: (target, measured, PASS/FAIL or n/a)."""

    def get(proxy, metric):
        return median.get((proxy, metric))

    def against(metric, theirs, label, minimum=None, maximum=None):
        mine = get(AE, metric)
        if mine is None or not theirs:
            return "n/a", None
        r = mine / theirs
        ok = (minimum is None or r >= minimum) and (maximum is None or r <= maximum)
        return f"{mine:g} / {theirs:g} ({label}) = {r:.2f}×", ok

    def against_haproxy(metric, **bound):
        theirs, which = best(median, HAPROXY, metric)
        return against(metric, theirs, which or "haproxy", **bound)

    checks = []
    for metric, what in (
        ("https_conn_per_s", "new HTTPS conn/s"),
        ("http_conn_per_s", "new plain-HTTP conn/s"),
    ):
        checks.append((f"{what} ≥ 1.0× haproxy at its best", *against_haproxy(metric, minimum=1.0)))
    for metric, what in (
        ("cpu_us_per_https_conn", "proxy CPU per HTTPS connection"),
        ("cpu_us_per_http_conn", "proxy CPU per HTTP connection"),
    ):
        checks.append((f"{what} ≤ 1.0× haproxy at its best", *against_haproxy(metric, maximum=1.0)))
    checks.append(
        ("one-connection p50 ≤ haproxy at its best", *against_haproxy("latency_p50_ms", maximum=1.0))
    )

    mine, direct = get(AE, "latency_p99_ms"), get("none", "latency_p99_ms")
    if mine is None or direct is None:
        checks.append(("one-connection p99 ≤ direct + 0.5 ms", "n/a", None))
    else:
        checks.append(
            (
                "one-connection p99 ≤ direct + 0.5 ms",
                f"{mine:g} ms vs {direct:g} + 0.5 = {direct + 0.5:.3f} ms",
                mine <= direct + 0.5,
            )
        )
    for metric, what in (("raw_bulk_MBps", "raw bulk"), ("tls_bulk_MBps", "TLS bulk")):
        checks.append(
            (f"{what} ≥ 0.8× direct", *against(metric, get("none", metric), "none", minimum=0.8))
        )
    # Memory against haproxy's default, the variant a host runs.
    checks.append(
        (
            "RSS with 2,000 idle conns ≤ 0.5× haproxy",
            *against("rss_idle_MB", get("haproxy", "rss_idle_MB"), "haproxy", maximum=0.5),
        )
    )

    # #14: watchers of the event stream may not slow the proxy down much:
    # each round's watched run against the unwatched ones around it.
    paired = get(AE, "watched_conn_ratio")
    watched, alone = get(AE, "https_conn_per_s_3_watchers"), get(AE, "https_conn_per_s")
    if paired is not None:
        checks.append(
            (
                "HTTPS conn/s with 3 event-stream clients ≥ 0.95× without",
                f"median over the rounds of watched / mean(before, after) = {paired:.3f}×",
                paired >= 0.95,
            )
        )
    elif watched is None or not alone:
        checks.append(("HTTPS conn/s with 3 event-stream clients ≥ 0.95× without", "n/a", None))
    else:
        checks.append(
            (
                "HTTPS conn/s with 3 event-stream clients ≥ 0.95× without",
                f"{watched:g} / {alone:g} = {watched / alone:.2f}×",
                watched / alone >= 0.95,
            )
        )

    held = get(AE, "held_MB_over_resting")
    checks.append(
        (
            "1,000 held connections ≤ 3 MB over resting",
            "n/a" if held is None else f"{held:g} MB",
            None if held is None else held <= 3.0,
        )
    )
    # The release: what an answer adds to a handshake the proxy lets through at once.
    one, plain = get(AE, "release_one_p99_ms"), get(AE, "plain_handshake_p99_ms")
    checks.append(
        (
            "an answer releases its connection in ≤ 1 ms p99 (over a plain handshake's p99)",
            "n/a" if one is None or plain is None else f"{one:g} ms vs {plain:g} ms: {one - plain:+.3f} ms",
            None if one is None or plain is None else one - plain <= 1.0,
        )
    )

    # #12: DNS through the handler against straight to the same dnsmasq.
    for variant, what in (("repeated", "one name"), ("unique", "a new name each")):
        for pct, bound in (("p50", 0.2), ("p99", 1.0)):
            mine, direct = get(AE, f"dns_{variant}_{pct}_ms"), get("none", f"dns_{variant}_{pct}_ms")
            label = f"DNS {pct}, {what}, ≤ direct + {bound:g} ms"
            if mine is None or direct is None:
                checks.append((label, "n/a", None))
            else:
                checks.append(
                    (label, f"{mine:g} ms vs {direct:g} ms: {mine - direct:+.3f} ms", mine - direct <= bound)
                )
    for variant, what, minimum in (
        ("unique", "a new name each (never cached)", 0.8),
        ("repeated", "one name (cached)", 2.0),
    ):
        metric = f"dns_{variant}_qps"
        checks.append(
            (
                f"DNS queries/s, {what}, ≥ {minimum:g}× direct",
                *against(metric, get("none", metric), "none", minimum=minimum),
            )
        )

    mine = get(AE, "blocked_p50_ms")
    p99 = get(AE, "blocked_p99_ms")
    if mine is None:
        checks.append(("a blocked connection fails in < 5 ms (p50)", "n/a", None))
    else:
        checks.append(
            (
                "a blocked connection fails in < 5 ms (p50)",
                f"p50 {mine:g} ms (p99 {p99:g} ms)",
                mine < 5,
            )
        )
    return checks


def dns_budget(median, cores):
    """#12's throughput targets as CPU: at the target rate the cores give so many
    µs a query, dnsperf and dnsmasq take theirs (as measured through the
    handler), and what is left is the handler's budget. The ceiling is the rate
    with a handler that cost nothing."""
    get = lambda p, m: median.get((p, m))
    rows = []
    for variant, what, minimum in (("unique", "a new name each", 0.8), ("repeated", "one name", 2.0)):
        direct = get("none", f"dns_{variant}_qps")
        client = get(AE, f"client_cpu_us_per_dns_query_{variant}")
        server = get(AE, f"server_cpu_us_per_dns_query_{variant}")
        handler = get(AE, f"cpu_us_per_dns_query_{variant}")
        if None in (direct, client, server, handler) or not cores:
            continue
        target = minimum * direct
        per_query = cores * 1e6 / target
        ceiling = cores * 1e6 / (client + server)
        rows.append([
            f"{what}, {minimum:g}× direct = {target:,.0f} q/s",
            f"{per_query:.1f}",
            f"{client:g} + {server:g}",
            f"{per_query - client - server:.1f}",
            f"{handler:g}",
            f"{ceiling:,.0f} q/s = {ceiling / direct:.2f}× direct",
        ])
    return rows


def fmt(value):
    if value is None:
        return "n/a"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    values = defaultdict(list)  # (proxy, metric) -> [value per round]
    with open(sys.argv[1]) as results:
        for line in results:
            proxy, round_, metric, value = line.rstrip("\n").split("\t")
            values[(proxy, metric)].append((int(round_), float(value)))
    with open(sys.argv[2]) as f:
        meta = json.load(f)

    proxies = [p for p in PROXIES if any(k[0] == p for k in values)]
    median = {k: statistics.median(v for _, v in vs) for k, vs in values.items()}
    metrics = [m for m in METRICS if any((p, m) in median for p in proxies)]

    out = [f"# agent-egress side-by-side benchmark, {meta['date']}", ""]
    out.append(
        f"Medians of {meta['rounds']} interleaved rounds (each round runs every proxy once, "
        f"in the order {', '.join(meta['proxies'].split())}). Every proxy sits behind the same TPROXY "
        "capture of the same agent cgroup; `none` is the direct path without capture. "
        "MB = 10^6 bytes. n/a: not measured (no proxy process, or no block configured)."
    )
    out.append("")
    rows = []
    for m in metrics:
        what, unit, better = METRICS[m]
        rows.append(
            [f"{what} ({unit}, {better} is better)"] + [fmt(median.get((p, m))) for p in proxies]
        )
    out += ["## Medians", "", table(["test"] + proxies, rows), ""]

    ratio_columns = [(a, b) for a, b in RATIOS if a in proxies and b in proxies]
    if ratio_columns:
        rows = []
        for m in metrics:
            cells = []
            for a, b in ratio_columns:
                x, y = median.get((a, m)), median.get((b, m))
                cells.append(f"{x / y:.2f}×" if x is not None and y else "n/a")
            if any(c != "n/a" for c in cells):
                rows.append([METRICS[m][0]] + cells)
        out += [
            "## Ratios of medians",
            "",
            "Above 1 is more of the quantity (better for rates, worse for times, memory and CPU).",
            "",
            table(["test"] + [f"{a} ÷ {b}" for a, b in ratio_columns], rows),
            "",
        ]

    rows = []
    for target, measured, ok in target_checks(median):
        verdict = "n/a" if ok is None else ("PASS" if ok else "FAIL")
        rows.append([target, measured, verdict])
    out += ["## The issue's targets (agent-egress)", "", table(["target", "measured", "result"], rows), ""]

    rows = dns_budget(median, int(meta.get("cores", 0) or 0))
    if rows:
        out += [
            f"## #12's DNS throughput as CPU ({meta.get('cores')} cores, shared by dnsperf, dnsmasq and the handler)",
            "",
            "µs of CPU a query. A handler over its budget cannot reach the target here; "
            "the ceiling is the rate if the handler cost nothing.",
            "",
            table(["target", "cores' µs a query", "dnsperf + dnsmasq", "left for the handler",
                   "the handler's", "ceiling"], rows),
            "",
        ]

    rows = []
    rounds = sorted({r for vs in values.values() for r, _ in vs})
    for m in metrics:
        for p in proxies:
            by_round = dict(values.get((p, m), []))
            if by_round:
                rows.append([m, p] + [fmt(by_round.get(r)) for r in rounds])
    out += [
        "## Every round",
        "",
        table(["metric", "proxy"] + [f"round {r}" for r in rounds], rows),
        "",
    ]

    out += ["## Setup", ""]
    for key in (
        "kernel", "cpu", "cores", "load", "load_end", "seconds", "proxies", "params",
        "agent_egress", "commit", "v2ray", "haproxy", "nginx", "curl", "wrk", "iperf3", "python",
    ):
        if key in meta:
            label = {"load": "load average at start", "load_end": "load average at end",
                     "seconds": "run time (s)", "commit": "repository commit"}.get(key, key)
            out.append(f"- {label}: {meta[key]}")
    print("\n".join(out))


if __name__ == "__main__":
    main()
