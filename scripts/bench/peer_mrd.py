#!/usr/bin/env python3
"""The peer in the benchmark suite: the official Python client reading one object
as gcsfs reads zonal objects.

google-cloud-storage's AsyncMultiRangeDownloader (BidiReadObject), a pool of 4
downloaders (gcsfs's MRDPool, pool_size 4) with 4 ranges in flight (gcsfs's
concurrency 4), the object split into PART-byte ranges taken in order. Every
range lands in one preallocated buffer (gcsfs's DirectMemmoveBuffer idea).

    python peer_mrd.py --endpoint HOST:PORT --bucket B --object O --size N
        [--part BYTES] [--streams 4] [--sha256 HEX]

Prints one line: `mbps=... bytes=... seconds=...`; exits non-zero if the bytes
received are not the object's size (or, with --sha256, not its bytes).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import time


class Into:
    """A write()-able view of one slice of the preallocated buffer."""

    def __init__(self, view: memoryview):
        self.view = view
        self.at = 0

    def write(self, b) -> int:
        n = len(b)
        self.view[self.at : self.at + n] = b
        self.at += n
        return n


def client_api():
    try:
        from google.cloud.storage.asyncio.async_grpc_client import AsyncGrpcClient
        from google.cloud.storage.asyncio.async_multi_range_downloader import (
            AsyncMultiRangeDownloader,
        )
    except ImportError:  # older releases kept it under _experimental
        from google.cloud.storage._experimental.asyncio.async_grpc_client import (  # type: ignore
            AsyncGrpcClient,
        )
        from google.cloud.storage._experimental.asyncio.async_multi_range_downloader import (  # type: ignore
            AsyncMultiRangeDownloader,
        )
    return AsyncGrpcClient, AsyncMultiRangeDownloader


def anonymous_client(endpoint: str):
    """The official async gRPC client on `endpoint` without credentials (the
    emulator's), and its multi-range downloader class."""
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials

    AsyncGrpcClient, MRD = client_api()
    client = AsyncGrpcClient(
        credentials=AnonymousCredentials(),
        client_options=ClientOptions(api_endpoint=endpoint),
    )
    return client, MRD


async def run(a) -> int:
    client, MRD = anonymous_client(a.endpoint)
    buf = bytearray(a.size)
    view = memoryview(buf)
    parts = [(off, min(a.part, a.size - off)) for off in range(0, a.size, a.part)]
    t0 = time.monotonic()
    pool = [await MRD.create_mrd(client, a.bucket, a.object) for _ in range(a.streams)]
    queue: asyncio.Queue = asyncio.Queue()
    for p in parts:
        queue.put_nowait(p)
    got = 0

    async def worker(mrd):
        nonlocal got
        while True:
            try:
                off, n = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            sink = Into(view[off : off + n])
            await mrd.download_ranges([(off, n, sink)])
            got += sink.at

    await asyncio.gather(*(worker(m) for m in pool))
    secs = time.monotonic() - t0
    for m in pool:
        await m.close()
    print(f"mbps={got / secs / 1e6:.0f} bytes={got} seconds={secs:.3f}", flush=True)
    if got != a.size:
        print(f"peer: got {got} bytes, want {a.size}", file=sys.stderr)
        return 1
    if a.sha256 and hashlib.sha256(buf).hexdigest() != a.sha256:
        print("peer: bytes differ from the object", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--endpoint", required=True)
    p.add_argument("--bucket", required=True)
    p.add_argument("--object", required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--part", type=int, default=16 << 20)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--sha256")
    return asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
