#!/usr/bin/env python3
"""The peer for small-file writes in the benchmark suite: the official Python
client writing local directories of small files as objects, one appendable
object a file, as gcsfs writes the zonal files it creates.

Per file: read the local file whole, then google-cloud-storage's
AsyncAppendableObjectWriter: open (a new appendable object), one append() of
the whole file, close(finalize_on_close=True) with its CRC32C. CONCURRENCY
files in flight: that many asyncio tasks in one process share one
AsyncGrpcClient and take the next file of the listing in turn. The listing is
small_read.py's (each SRC sorted by name, depth first); file SRC/REL becomes
object PREFIX/basename(SRC)/REL (small_write.py's layout).

    python peer_small_write.py --endpoint HOST:PORT --bucket B --prefix P
        [--concurrency 8] SRC [SRC...]

Prints one line: `files=... bytes=... seconds=...`, where seconds covers the
listing and the writing; exits non-zero if a finalized object's size is not
its file's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

from peer_mrd import anonymous_client
from small_read import listing


async def run(a) -> int:
    import google_crc32c
    from google.cloud.storage.asyncio.async_appendable_object_writer import (
        AsyncAppendableObjectWriter,
    )

    client, _ = anonymous_client(a.endpoint)
    t0 = time.monotonic()
    files = [(path, f"{a.prefix}/{os.path.basename(os.path.normpath(src))}/"
                    f"{os.path.relpath(path, src)}")
             for src in a.srcs for path in listing(src)]
    todo = iter(files)  # shared by the tasks: each takes the next file
    written = total = 0
    wrong: list[str] = []

    async def worker() -> None:
        nonlocal written, total
        for path, name in todo:
            with open(path, "rb", buffering=0) as f:
                data = f.read()
            w = AsyncAppendableObjectWriter(client, a.bucket, name)
            await w.open()
            await w.append(data)
            obj = await w.close(finalize_on_close=True,
                                full_object_checksum=google_crc32c.value(data))
            if obj.size != len(data):
                wrong.append(f"{name}: finalized {obj.size} bytes, the file has {len(data)}")
            written += 1
            total += obj.size

    await asyncio.gather(*(worker() for _ in range(a.concurrency)))
    secs = time.monotonic() - t0
    print(f"files={written} bytes={total} seconds={secs:.3f}", flush=True)
    if wrong or written != len(files):
        print(f"peer_small_write: {written} of {len(files)} files written; "
              + "; ".join(wrong[:5]), file=sys.stderr)
        return 1
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--endpoint", required=True)
    p.add_argument("--bucket", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("srcs", nargs="+")
    return asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
