#!/usr/bin/env python3
"""The peer on small files in the benchmark suite: the official Python client
reading many small objects whole, as gcsfs reads a zonal file it opens.

Per object: google-cloud-storage's AsyncMultiRangeDownloader.create_mrd (opens a
BidiReadObject stream), one download_ranges call for the whole object into a
preallocated buffer, close. CONCURRENCY objects in flight: that many asyncio
tasks in one process share one AsyncGrpcClient and take the next object from
the manifest in turn.

    python peer_small.py --endpoint HOST:PORT --bucket B --manifest FILE
        [--concurrency 8]

FILE lists the objects, one `NAME<TAB>SIZE` a line, in the order they are
taken (the names are known, as a loader's index would know them; nothing is
listed). Prints one line: `files=... bytes=... seconds=...`; exits non-zero if
the bytes received are not the objects' sizes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from peer_mrd import Into, anonymous_client


def read_manifest(path: str) -> list[tuple[str, int]]:
    with open(path) as f:
        return [(name, int(size)) for name, size in (line.split("\t") for line in f)]


async def run(a) -> int:
    client, MRD = anonymous_client(a.endpoint)
    objects = read_manifest(a.manifest)
    largest = max(size for _, size in objects)
    todo = iter(objects)  # shared by the tasks: each takes the next object
    files = got = 0

    async def worker() -> None:
        nonlocal files, got
        view = memoryview(bytearray(largest))
        for name, size in todo:
            mrd = await MRD.create_mrd(client, a.bucket, name)
            try:
                sink = Into(view[:size])
                await mrd.download_ranges([(0, size, sink)])
            finally:
                await mrd.close()
            files += 1
            got += sink.at

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(a.concurrency)))
    secs = time.monotonic() - t0
    print(f"files={files} bytes={got} seconds={secs:.3f}", flush=True)
    want = sum(size for _, size in objects)
    if files != len(objects) or got != want:
        print(f"peer_small: got {files} objects, {got} bytes; want {len(objects)}, {want}",
              file=sys.stderr)
        return 1
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--endpoint", required=True)
    p.add_argument("--bucket", required=True)
    p.add_argument("--manifest", required=True)
    p.add_argument("--concurrency", type=int, default=8)
    return asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
