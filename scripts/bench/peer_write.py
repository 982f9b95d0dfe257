#!/usr/bin/env python3
"""The peer for writes in the benchmark suite: the official Python client
uploading a local file as an appendable object, as gcsfs writes zonal files.

google-cloud-storage's AsyncAppendableObjectWriter: open (a new appendable
object), append() the file in PIECE-byte pieces (the writer sends 2 MiB chunks
and flushes every 16 MiB, its default), then close(finalize_on_close=True)
with the whole object's CRC32C.

    python peer_write.py --endpoint HOST:PORT --bucket B --object O --source PATH
        [--piece BYTES]

Prints one line: `mbps=... bytes=... seconds=...`; exits non-zero if the
finalized object's size is not the file's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

from peer_mrd import anonymous_client


async def run(a) -> int:
    import google_crc32c
    from google.cloud.storage.asyncio.async_appendable_object_writer import (
        AsyncAppendableObjectWriter,
    )

    client, _ = anonymous_client(a.endpoint)
    size = os.path.getsize(a.source)
    crc = google_crc32c.Checksum()
    t0 = time.monotonic()
    w = AsyncAppendableObjectWriter(client, a.bucket, a.object)
    await w.open()
    with open(a.source, "rb", buffering=0) as f:
        while piece := f.read(a.piece):
            crc.update(piece)
            await w.append(piece)
    obj = await w.close(finalize_on_close=True,
                        full_object_checksum=int.from_bytes(crc.digest(), "big"))
    secs = time.monotonic() - t0
    if obj.size != size:
        print(f"finalized {obj.size} bytes, the file has {size}", file=sys.stderr)
        return 1
    print(f"mbps={size / secs / 1e6:.0f} bytes={size} seconds={secs:.3f}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--endpoint", required=True)
    p.add_argument("--bucket", required=True)
    p.add_argument("--object", required=True)
    p.add_argument("--source", required=True)
    p.add_argument("--piece", type=int, default=16 << 20)
    return asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
