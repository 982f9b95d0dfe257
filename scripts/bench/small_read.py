#!/usr/bin/env python3
"""The small-file reader in the benchmark suite: reads a tree of small files
whole, the way an image-corpus loader does.

One process lists every DIR (os.scandir, entries sorted by name, directories
descended in that order) into one listing, then forks PROCS readers. Reader k
takes files k, k+PROCS, k+2*PROCS, ... of the listing (an interleaved split, as a
data loader hands out consecutive samples to its workers) and opens, reads whole
(1 MiB reads into one buffer, until end of file) and closes each in turn.
With --order random the whole listing is shuffled first (random.Random(SEED),
so every run reads the same order) and reader k takes the same interleaved
share of the shuffled list: files come from any directory, in no order.

    python small_read.py [--procs N] [--order listing|random] [--seed S] DIR [DIR...]

Prints one line: `files=... bytes=... list_seconds=... seconds=...`, where
seconds covers the listing and the reading (interpreter start-up excluded).
Exits non-zero if a reader fails.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import traceback

MiB = 1 << 20


def listing(root: str) -> list[str]:
    """Every regular file under root, in sorted-name order, depth first."""
    with os.scandir(root) as it:
        entries = sorted(it, key=lambda e: e.name)
    files = []
    for e in entries:
        if e.is_dir(follow_symlinks=False):
            files += listing(e.path)
        elif e.is_file(follow_symlinks=False):
            files.append(e.path)
    return files


def read_all(paths: list[str]) -> tuple[int, int]:
    buf = bytearray(MiB)
    total = 0
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            while n := os.readv(fd, [buf]):
                total += n
        finally:
            os.close(fd)
    return len(paths), total


def fork_reader(paths: list[str]) -> tuple[int, int]:
    """Starts one reader process; returns its pid and the pipe it reports on."""
    return fork_worker(read_all, paths)


def fork_worker(work, items: list) -> tuple[int, int]:
    """Starts one process running work(items), which returns (files, bytes);
    returns its pid and the pipe it reports them on (see collect)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 1
        try:
            files, nbytes = work(items)
            os.write(w, f"{files} {nbytes}".encode())
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def collect(pid: int, r: int) -> tuple[int, int] | None:
    """Waits for one reader; its (files, bytes), or None if it failed."""
    with os.fdopen(r, "rb") as f:
        report = f.read().decode()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0 or not report:
        return None
    files, nbytes = report.split()
    return int(files), int(nbytes)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--procs", type=int, default=1)
    p.add_argument("--order", choices=("listing", "random"), default="listing")
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("dirs", nargs="+")
    a = p.parse_args()
    t0 = time.monotonic()
    files = [f for d in a.dirs for f in listing(d)]
    if a.order == "random":
        random.Random(a.seed).shuffle(files)
    t1 = time.monotonic()
    readers = [fork_reader(files[k :: a.procs]) for k in range(a.procs)]
    counts = [collect(pid, r) for pid, r in readers]
    secs = time.monotonic() - t0
    if None in counts:
        print("small_read: a reader failed", file=sys.stderr)
        return 1
    print(f"files={sum(c[0] for c in counts)} bytes={sum(c[1] for c in counts)} "
          f"list_seconds={t1 - t0:.3f} seconds={secs:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
