#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-3.0-or-later
"""Where each proxy's CPU goes per connection, by system call, side by side.

Reads `perf script -F comm,ip,sym` output of `perf record -g -F FREQ` runs
and prints, for each run, the CPU time per unit of work (connection or query)
spent in each system call (with all the kernel work it does: a send's
delivery to the peer on loopback, a connect's handshake) and outside any
(user space; other kernel work such as interrupts), split by thread group:

    perf_by_syscall.py --freq 2000 NAME=SCRIPT_FILE:UNITS [...]

A sample inside a system call is counted for the handler right below
do_syscall_64 (`__x64_sys_sendto`, `ksys_read`, ...), named without its
prefix.
"""

import argparse
import collections
import re

PREFIX = re.compile(r"^(__x64_sys_|__do_sys_|__se_sys_|ksys_|__sys_)")


def samples(path):
    """Each sample's thread name and frames (address, symbol), innermost first."""
    comm, frames = None, []
    with open(path, errors="replace") as script:
        for line in script:
            line = line.rstrip("\n")
            if not line.strip():
                if comm is not None:
                    yield comm, frames
                comm, frames = None, []
            elif line[0] in " \t":
                parts = line.split(None, 1)
                if len(parts) == 2:
                    frames.append((parts[0], parts[1].split("+")[0].strip()))
            else:
                comm, frames = line.split()[0], []
    if comm is not None:
        yield comm, frames


def where(frames):
    symbols = [symbol for _, symbol in frames]
    if "do_syscall_64" in symbols:
        at = symbols.index("do_syscall_64")
        return PREFIX.sub("", symbols[at - 1]) if at > 0 else "?"
    # Kernel text is mapped at the top of the address space.
    in_kernel = bool(frames) and frames[0][0].startswith("ffffffff")
    return "(kernel, outside system calls)" if in_kernel else "(user space)"


def group(comm):
    """Threads of one role together (worker-0, worker-1: workers)."""
    return re.sub(r"-\d+$", "", comm)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--freq", type=float, required=True, help="perf record -F")
    parser.add_argument("runs", nargs="+", help="NAME=SCRIPT_FILE:UNITS")
    args = parser.parse_args()
    us_per_sample = 1e6 / args.freq
    tables, threads, names = [], [], []
    for run in args.runs:
        name, rest = run.split("=", 1)
        path, units = rest.rsplit(":", 1)
        units = float(units)
        by_call, by_thread = collections.Counter(), collections.Counter()
        for comm, frames in samples(path):
            by_call[where(frames)] += 1
            by_thread[group(comm)] += 1
        tables.append({k: v * us_per_sample / units for k, v in by_call.items()})
        threads.append({k: v * us_per_sample / units for k, v in by_thread.items()})
        names.append(name)

    def show(title, rows):
        keys = sorted({k for t in rows for k in t}, key=lambda k: -max(t.get(k, 0) for t in rows))
        width = max(len(title), *(len(k) for k in keys))
        print(f"{title:<{width}} " + " ".join(f"{n:>20}" for n in names))
        for key in keys:
            print(f"{key:<{width}} " + " ".join(f"{t.get(key, 0):20.1f}" for t in rows))
        print(f"{'total':<{width}} " + " ".join(f"{sum(t.values()):20.1f}" for t in rows))
        print()

    show("µs per unit, by system call", tables)
    show("µs per unit, by thread", threads)


if __name__ == "__main__":
    main()
