#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-3.0-or-later
"""The benchmark's own clients, for what curl and wrk do not measure well.

latency  fresh TCP + TLS + GET, one at a time: p50/p99 of the whole exchange
blocked  how long a connection to a blocked name takes to fail
idle     hold N TLS connections open (handshake done, no request) and read a
         process's resident memory before and with them
held     hold N TLS connections on one question of the `ask` verdict (each sent
         its ClientHello and waits), read the proxy's resident memory before
         and with them, answer over the control socket and time each
         connection's release (answer to ServerHello); then, one connection at
         a time, the same release time against a plain handshake's
dns      DNS queries over UDP for one name (repeated: a cache may answer) or
         names below it (--unique: each a first), p50/p99 one at a time
         (throughput is dnsperf's, in run.sh)

Each prints one JSON object on stdout. Run inside the agent cgroup and netns;
names resolve through that netns's hosts file.
"""

import argparse
import json
import resource
import select
import socket
import ssl
import statistics
import struct
import sys
import time

TIMEOUT_S = 10


def tls_context():
    ctx = ssl.create_default_context()
    # The bench server's certificate is self-signed: the test is of the path, not of PKI.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def percentile(values, fraction):
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def tls_connect(ctx, host, port):
    raw = socket.create_connection((host, port), timeout=TIMEOUT_S)
    try:
        return ctx.wrap_socket(raw, server_hostname=host)
    except BaseException:
        raw.close()
        raise


def one_exchange(ctx, host, port, path):
    with tls_connect(ctx, host, port) as conn:
        request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        conn.sendall(request.encode())
        response = b""
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            response += chunk
    if not response.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"unexpected response: {response[:60]!r}")


def latency(args):
    ctx = tls_context()
    times_ms = []
    errors = []
    for _ in range(args.count):
        start = time.perf_counter()
        try:
            one_exchange(ctx, args.host, args.port, args.path)
        except (OSError, RuntimeError) as e:
            errors.append(str(e))
            continue
        times_ms.append((time.perf_counter() - start) * 1000)
    if not times_ms:
        return {"error": f"all {args.count} exchanges failed: {errors[:3]}"}
    return {
        "count": len(times_ms),
        "errors": len(errors),
        "first_errors": errors[:3],
        "p50_ms": percentile(times_ms, 0.50),
        "p99_ms": percentile(times_ms, 0.99),
        "mean_ms": statistics.fmean(times_ms),
    }


def blocked(args):
    ctx = tls_context()
    times_ms = []
    passed = 0
    for _ in range(args.count):
        start = time.perf_counter()
        try:
            one_exchange(ctx, args.host, args.port, args.path)
            passed += 1
        except (OSError, RuntimeError):
            times_ms.append((time.perf_counter() - start) * 1000)
    result = {"count": args.count, "not_blocked": passed}
    if times_ms:
        result["p50_ms"] = percentile(times_ms, 0.50)
        result["p99_ms"] = percentile(times_ms, 0.99)
    return result


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def closed_by_peer(conns):
    """How many connections the other end has closed while they sat idle."""
    poller = select.poll()
    for conn in conns:
        # Not POLLIN: TLS 1.3 session tickets arrive after the handshake.
        poller.register(conn.fileno(), select.POLLRDHUP)
    return len(poller.poll(0))


def room_for(count):
    """Enough open files for count connections and a few more."""
    needed = count + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(needed, soft), max(needed, hard)))


def idle(args):
    room_for(args.count)
    ctx = tls_context()
    before = rss_kib(args.pid)
    conns = []
    errors = []
    start = time.perf_counter()
    try:
        for _ in range(args.count):
            try:
                conns.append(tls_connect(ctx, args.host, args.port))
            except OSError as e:
                errors.append(str(e))
                if len(errors) > args.count // 100:
                    break
        opened_s = time.perf_counter() - start
        # Let the proxy finish whatever each accepted connection set in motion.
        time.sleep(args.settle)
        with_conns = rss_kib(args.pid)
        closed = closed_by_peer(conns)
    finally:
        for conn in conns:
            conn.close()
    return {
        "opened": len(conns),
        "closed_by_peer": closed,
        "errors": len(errors),
        "first_errors": errors[:3],
        "open_seconds": opened_s,
        "rss_before_kib": before,
        "rss_with_kib": with_conns,
    }


def control(socket_path, method, path, body=None):
    """One request to the control API; its JSON answer."""
    payload = json.dumps(body).encode() if body is not None else b""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(TIMEOUT_S)
        conn.connect(socket_path)
        conn.sendall(
            f"{method} {path} HTTP/1.1\r\nHost: agent-egress\r\nContent-Length: {len(payload)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + payload
        )
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, text = answer.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 2"):
        raise RuntimeError(f"{method} {path}: {head[:80]!r} {text[:200]!r}")
    return json.loads(text) if text else None


def hello_sent(ctx, address, port, host):
    """A TLS connection that has sent its ClientHello and not waited for more."""
    raw = socket.create_connection((address, port), timeout=TIMEOUT_S)
    raw.setblocking(False)
    conn = ctx.wrap_socket(raw, server_hostname=host, do_handshake_on_connect=False)
    try:
        conn.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return conn


def until_readable(conns, start):
    """Milliseconds from start until each connection had bytes to read."""
    poller = select.poll()
    for conn in conns:
        poller.register(conn.fileno(), select.POLLIN)
    left = len(conns)
    times_ms = []
    deadline = start + TIMEOUT_S
    while left and time.perf_counter() < deadline:
        for fd, _ in poller.poll(100):
            times_ms.append((time.perf_counter() - start) * 1000)
            poller.unregister(fd)
            left -= 1
    if left:
        raise RuntimeError(f"{left} of {len(conns)} connections got nothing back")
    return times_ms


def question_for(socket_path, host, held):
    """The pending question about host once it holds `held` connections."""
    deadline = time.perf_counter() + TIMEOUT_S
    while time.perf_counter() < deadline:
        for q in control(socket_path, "GET", "/v1/questions")["questions"]:
            if q["host"] == host and q["held"] >= held:
                return q["id"]
        time.sleep(0.01)
    raise RuntimeError(f"no question about {host} holding {held} connections")


def held(args):
    room_for(args.count)
    ctx = tls_context()
    before = rss_kib(args.pid)
    conns = [hello_sent(ctx, args.address, args.port, args.host) for _ in range(args.count)]
    try:
        qid = question_for(args.socket, args.host, args.count)
        time.sleep(args.settle)
        with_conns = rss_kib(args.pid)
        start = time.perf_counter()
        control(args.socket, "POST", f"/v1/questions/{qid}/answer", {"answer": "allow-once"})
        released_ms = until_readable(conns, start)
    finally:
        for conn in conns:
            conn.close()
    # One held connection at a time: answer to ServerHello, against a plain
    # handshake's ClientHello to ServerHello (the allowed name, same server).
    one_ms = []
    plain_ms = []
    for _ in range(args.rounds):
        conn = hello_sent(ctx, args.address, args.port, args.host)
        try:
            qid = question_for(args.socket, args.host, 1)
            start = time.perf_counter()
            control(args.socket, "POST", f"/v1/questions/{qid}/answer", {"answer": "allow-once"})
            one_ms += until_readable([conn], start)
        finally:
            conn.close()
        start = time.perf_counter()
        conn = hello_sent(ctx, args.address, args.port, args.allowed)
        try:
            plain_ms += until_readable([conn], start)
        finally:
            conn.close()
    return {
        "held": len(conns),
        "rss_before_kib": before,
        "rss_with_kib": with_conns,
        "release_all_p50_ms": percentile(released_ms, 0.50),
        "release_all_p99_ms": percentile(released_ms, 0.99),
        "release_one_p50_ms": percentile(one_ms, 0.50),
        "release_one_p99_ms": percentile(one_ms, 0.99),
        "plain_handshake_p50_ms": percentile(plain_ms, 0.50),
        "plain_handshake_p99_ms": percentile(plain_ms, 0.99),
    }


def dns_query(qid, name):
    header = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    labels = b"".join(bytes([len(label)]) + label.encode() for label in name.split("."))
    return header + labels + b"\0\0\1\0\1"


def dns(args):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((args.server, 53))
    sock.settimeout(TIMEOUT_S)
    serial = [0]

    def next_query():
        serial[0] += 1
        name = f"q{serial[0]}.{args.name}" if args.unique else args.name
        return serial[0] & 0xFFFF, dns_query(serial[0] & 0xFFFF, name)

    times, errors = [], 0
    for _ in range(args.count):
        qid, query = next_query()
        started = time.perf_counter()
        sock.send(query)
        try:
            while struct.unpack(">H", sock.recv(4096)[:2])[0] != qid:
                pass
            times.append((time.perf_counter() - started) * 1000)
        except socket.timeout:
            errors += 1
    return {
        "p50_ms": percentile(times, 0.5) if times else None,
        "p99_ms": percentile(times, 0.99) if times else None,
        "errors": errors,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="test", required=True)
    p = sub.add_parser("dns")
    p.add_argument("--server", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--unique", action="store_true")
    p = sub.add_parser("held")
    p.add_argument("--host", required=True, help="the name the policy asks about")
    p.add_argument("--allowed", required=True, help="an allowed name on the same server")
    p.add_argument("--address", required=True, help="the server's address")
    p.add_argument("--port", type=int, default=443)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--rounds", type=int, default=50, help="one-at-a-time releases")
    p.add_argument("--socket", required=True, help="the control socket")
    p.add_argument("--pid", type=int, required=True, help="process whose RSS to read")
    p.add_argument("--settle", type=float, default=1.0, help="seconds before reading")
    for name in ("latency", "blocked", "idle"):
        p = sub.add_parser(name)
        p.add_argument("--host", required=True)
        p.add_argument("--port", type=int, default=443)
        p.add_argument("--count", type=int, required=True)
        if name != "idle":
            p.add_argument("--path", default="/hello.txt")
        else:
            p.add_argument("--pid", type=int, required=True, help="process whose RSS to read")
            p.add_argument("--settle", type=float, default=1.0, help="seconds before reading")
    args = parser.parse_args()
    tests = {"latency": latency, "blocked": blocked, "idle": idle, "held": held, "dns": dns}
    result = tests[args.test](args)
    json.dump(result, sys.stdout)
    print()
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
