# SPDX-License-Identifier: GPL-3.0-or-later
# 1,000 DNS queries for random labels below argv[2] (default allowed.test),
# sent at once to argv[1]:53 on one socket: the shape of data carried out in
# names. Prints how many answers came back with each rcode ("5:950 0:50").
# Shared by the e2e suite (tests/e2e/dns.rs) and the NixOS VM test.
import random
import socket
import string
import struct
import sys

suffix = sys.argv[2] if len(sys.argv) > 2 else "allowed.test"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
# Room for every answer, read after the burst: forced as root, asked otherwise.
try:
    s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE
except PermissionError:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.connect((sys.argv[1], 53))
s.settimeout(3)


def query(qid, name):
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\0\0\1\0\1"


for i in range(1000):
    label = "".join(random.choice(string.ascii_lowercase) for _ in range(20))
    s.send(query(i, f"{label}.{suffix}"))
codes = {}
try:
    while sum(codes.values()) < 1000:
        rcode = s.recv(4096)[3] & 0xF
        codes[rcode] = codes.get(rcode, 0) + 1
except socket.timeout:
    pass
print(" ".join(f"{k}:{v}" for k, v in sorted(codes.items())))
