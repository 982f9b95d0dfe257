#!/usr/bin/env python3
"""The small-file writer in the benchmark suite: copies local directories of
small files into a destination directory, the way a job writes an image corpus
or many outputs (the mirror of small_read.py).

One process lists every SRC (os.scandir, entries sorted by name, directories
descended in that order) into one listing, file SRC/REL to be copied to
DEST/basename(SRC)/REL, and creates every directory the copy needs
(os.makedirs), then forks PROCS writers. Writer k takes files
k, k+PROCS, k+2*PROCS, ... of the listing (an interleaved split) and for each
reads the local file whole, then opens its copy under DEST (O_CREAT|O_EXCL: a
new file), writes it whole and closes it; through a zonalfs mount the close
persists the object (the kernel's flush).

    python small_write.py [--procs N] --dest DEST SRC [SRC...]

Prints one line: `files=... bytes=... mkdir_seconds=... seconds=...`, where
seconds covers the listing, the directories and the writing (interpreter
start-up excluded) and mkdir_seconds the listing and the directories. Exits
non-zero if a writer fails (a write or a close returned an error).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

from small_read import collect, fork_worker, listing


def write_all(pairs: list[tuple[str, str]]) -> tuple[int, int]:
    """Copies each (source, destination) in turn; (files, bytes) written."""
    total = 0
    for src, dst in pairs:
        with open(src, "rb", buffering=0) as f:
            data = f.read()
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)  # the daemon persists here; an error raises
        total += len(data)
    return len(pairs), total


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--procs", type=int, default=1)
    p.add_argument("--dest", required=True)
    p.add_argument("srcs", nargs="+")
    a = p.parse_args()
    t0 = time.monotonic()
    pairs = [(f, os.path.join(a.dest, os.path.basename(os.path.normpath(src)),
                              os.path.relpath(f, src)))
             for src in a.srcs for f in listing(src)]
    for d in sorted({os.path.dirname(dst) for _, dst in pairs}):
        os.makedirs(d, exist_ok=True)
    t1 = time.monotonic()
    writers = [fork_worker(write_all, pairs[k :: a.procs]) for k in range(a.procs)]
    counts = [collect(pid, r) for pid, r in writers]
    secs = time.monotonic() - t0
    if None in counts:
        print("small_write: a writer failed", file=sys.stderr)
        return 1
    print(f"files={sum(c[0] for c in counts)} bytes={sum(c[1] for c in counts)} "
          f"mkdir_seconds={t1 - t0:.3f} seconds={secs:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
