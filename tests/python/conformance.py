#!/usr/bin/env python3
"""Conformance check of the zonalfs gRPC emulator against the official Python client.

Drives google-cloud-storage's asyncio AsyncMultiRangeDownloader (BidiReadObject)
against an emulator endpoint over a plaintext channel and compares every byte it
gets with a local copy of the object.

    python conformance.py --endpoint 127.0.0.1:PORT --bucket BUCKET \
        --object OBJECT --source PATH [--expect-redirects]

PATH is a local file holding the object's true bytes. Prints one line per check
("PASS ..." / "FAIL ..." / "INFO ..."), exits 0 only if every check passed.
Exit codes: 0 ok, 1 check failed, 2 usage/setup error, 3 overall timeout.
Pinned client versions: see requirements.txt next to this file.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import io
import logging
import os
import sys
import threading
import time
import traceback
import uuid

MiB = 1024 * 1024
CLOSE_TIMEOUT = 15.0

_failures: list[str] = []
_retry_log = None  # set in main(); errors the client retried


def emit(status: str, name: str, detail: str = "") -> None:
    line = f"{status:<4} {name}"
    if detail:
        line += f": {detail}"
    print(line, flush=True)
    if status == "FAIL":
        _failures.append(name)


def check(name: str, ok: bool, detail: str = "") -> bool:
    emit("PASS" if ok else "FAIL", name, detail)
    return ok


def info(name: str, detail: str = "") -> None:
    emit("INFO", name, detail)


# --------------------------------------------------------------------------
# Imports (the asyncio API moved from _experimental to a stable path in 3.x).
# --------------------------------------------------------------------------
def import_client_api():
    try:
        from google.cloud.storage.asyncio.async_grpc_client import AsyncGrpcClient
        from google.cloud.storage.asyncio import async_multi_range_downloader as mrd_mod
        where = "google.cloud.storage.asyncio"
    except ImportError:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from google.cloud.storage._experimental.asyncio.async_grpc_client import (  # type: ignore
                AsyncGrpcClient,
            )
            from google.cloud.storage._experimental.asyncio import (  # type: ignore
                async_multi_range_downloader as mrd_mod,
            )
        where = "google.cloud.storage._experimental.asyncio"
    return AsyncGrpcClient, mrd_mod.AsyncMultiRangeDownloader, mrd_mod, where


def redirect_info(exc):
    """(routing_token, read_handle) the client extracts from an error, or (None, None)."""
    try:
        try:
            from google.cloud.storage.asyncio.retry._helpers import _handle_redirect
        except ImportError:  # pragma: no cover - older layout
            from google.cloud.storage._experimental.asyncio.retry._helpers import (  # type: ignore
                _handle_redirect,
            )
        return _handle_redirect(exc)
    except Exception:  # pragma: no cover - defensive
        return None, None


class RetryLog:
    """Records every error the client retried (open and read paths)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, bool]] = []  # (phase, exc summary, had redirect)

    def hook(self, phase: str):
        def on_error(exc):
            token, handle = redirect_info(exc)
            redirected = token is not None or handle is not None
            summary = f"{type(exc).__name__}: {str(exc)[:160]}"
            if redirected:
                summary += f" [routing_token={token!r} read_handle={'set' if handle else None}]"
            self.events.append((phase, summary, redirected))

        return on_error

    @property
    def redirects(self) -> int:
        return sum(1 for _, _, r in self.events if r)


def make_retry(mrd_mod, retry_log: RetryLog, phase: str):
    """A faster-backoff copy of the client's default retry policy, with an on_error hook."""
    from google.api_core import exceptions as gexc
    from google.api_core.retry_async import AsyncRetry

    if phase == "open":
        predicate = getattr(mrd_mod, "_is_open_retryable", None)
    else:
        predicate = getattr(mrd_mod, "_is_read_retryable", None)
    if predicate is None:  # mirror the client's own predicate
        common = (
            gexc.InternalServerError,
            gexc.ServiceUnavailable,
            gexc.DeadlineExceeded,
            gexc.TooManyRequests,
            gexc.Aborted,
        )

        def predicate(exc):
            return isinstance(exc, common)

    return AsyncRetry(
        predicate=predicate,
        initial=0.05,
        maximum=1.0,
        multiplier=2.0,
        timeout=60.0,
        on_error=retry_log.hook(phase),
    )


def make_client(AsyncGrpcClient, endpoint: str):
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials

    # With AnonymousCredentials + api_endpoint the client builds
    # grpc.aio.insecure_channel(api_endpoint): plaintext HTTP/2, no auth.
    return AsyncGrpcClient(
        credentials=AnonymousCredentials(),
        client_options=ClientOptions(api_endpoint=endpoint),
    )


async def open_mrd(MRD, client, bucket, obj, retry_policy):
    kwargs = {}
    create = getattr(MRD, "create_mrd", None)
    if create is not None:
        if "retry_policy" in inspect.signature(create).parameters:
            kwargs["retry_policy"] = retry_policy
        return await create(client, bucket, obj, **kwargs)
    mrd = MRD(client, bucket, obj)
    if "retry_policy" in inspect.signature(mrd.open).parameters:
        kwargs["retry_policy"] = retry_policy
    await mrd.open(**kwargs)
    return mrd


async def download(mrd, ranges, retry_policy):
    """ranges: list of (offset, length); returns list of bytes."""
    bufs = [io.BytesIO() for _ in ranges]
    kwargs = {}
    if "retry_policy" in inspect.signature(mrd.download_ranges).parameters:
        kwargs["retry_policy"] = retry_policy
    await mrd.download_ranges(
        [(off, length, buf) for (off, length), buf in zip(ranges, bufs)], **kwargs
    )
    return [b.getvalue() for b in bufs]


def expected(src: bytes, off: int, length: int) -> bytes:
    return src[off:] if length == 0 else src[off : off + length]


def describe_mismatch(got: bytes, want: bytes, off: int) -> str:
    if len(got) != len(want):
        return f"got {len(got)} bytes, want {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            return f"first differing byte at object offset {off + i} (got {a:#04x}, want {b:#04x})"
    return "equal"


def plan_ranges(size: int):
    """Named (offset, length) ranges adapted to the object size. length 0 = to the end."""
    plan: list[tuple[str, int, int]] = []
    if size == 0:
        return [("whole object (0, 0)", 0, 0)]
    plan.append(("start", 0, min(size, 4096)))
    plan.append(("first byte", 0, 1))
    mid = size // 2
    plan.append(("middle", max(0, mid - 500), min(1000, size - max(0, mid - 500))))
    plan.append(("last byte", size - 1, 1))
    plan.append(("last bytes", max(0, size - 777), min(size, 777)))
    if size > 2 * MiB + 4096:
        plan.append(("across 2 MiB boundary", 2 * MiB - 4096, 8192))
        plan.append(("exactly 2 MiB at 0", 0, 2 * MiB))
    if size > 4 * MiB + 1:
        plan.append(("across 4 MiB boundary (1 byte each side)", 4 * MiB - 1, 2))
    if size > 6 * MiB:
        plan.append(("multi-chunk 5 MiB unaligned", MiB + 3, 5 * MiB))
    tail_off = max(0, size - min(size, 3 * MiB + 7))
    plan.append((f"to end (offset {tail_off}, length 0)", tail_off, 0))
    plan.append(("whole object (0, 0)", 0, 0))
    plan.append((f"whole object explicit (0, {size})", 0, size))
    return plan


async def run(args, src: bytes) -> None:
    AsyncGrpcClient, MRD, mrd_mod, where = import_client_api()
    info("client api", f"{where}.AsyncMultiRangeDownloader / AsyncGrpcClient")
    try:
        import google_crc32c

        check(
            "google_crc32c C extension (required by download_ranges checksum path)",
            google_crc32c.implementation == "c",
            f"implementation={google_crc32c.implementation}",
        )
        src_crc = google_crc32c.value(src)
    except ImportError:
        check("google_crc32c importable", False)
        src_crc = None

    from google.api_core import exceptions as gexc

    retry_log = _retry_log
    open_retry = make_retry(mrd_mod, retry_log, "open")
    read_retry = make_retry(mrd_mod, retry_log, "read")
    size = len(src)

    client = make_client(AsyncGrpcClient, args.endpoint)

    # ---------------- open + metadata ----------------
    try:
        mrd = await open_mrd(MRD, client, args.bucket, args.object, open_retry)
    except Exception as exc:
        check("open BidiReadObject stream", False, f"{type(exc).__name__}: {exc}")
        raise
    check("open BidiReadObject stream", bool(getattr(mrd, "is_stream_open", True)))

    persisted = getattr(mrd, "persisted_size", None)
    check("persisted_size == source size", persisted == size, f"persisted_size={persisted} source={size}")
    gen = getattr(mrd, "generation", None)
    if gen is None:
        gen = getattr(mrd, "generation_number", None)
    check(
        "generation is a positive int",
        isinstance(gen, int) and not isinstance(gen, bool) and gen > 0,
        f"generation={gen!r}",
    )
    finalized = getattr(mrd, "is_finalized", None)
    check(
        "is_finalized",
        finalized is True,
        f"is_finalized={finalized!r} (client sets it only if metadata.finalize_time is set "
        "and its seconds-of-minute is > 0)",
    )
    md = getattr(mrd, "object_metadata", None)
    if md is not None:
        check("metadata.name == object", md.name == args.object, f"name={md.name!r}")
        info("metadata.bucket", repr(md.bucket))
        info("metadata.finalize_time", repr(md.finalize_time))
    handle = getattr(mrd, "read_handle", None)
    check(
        "first response carries a non-empty read_handle",
        bool(handle) and bool(getattr(handle, "handle", b"")),
        f"read_handle={'%d bytes' % len(handle.handle) if handle else None}",
    )
    server_crc = getattr(mrd, "full_obj_server_crc32c", None)
    if src_crc is not None:
        # The client ignores an all-default checksums message, so crc32c 0 (e.g. the
        # empty object) reads back as None.
        check(
            "metadata.checksums.crc32c == crc32c(source)",
            server_crc == src_crc or (src_crc == 0 and server_crc is None),
            f"server={server_crc} source={src_crc}",
        )

    # ---------------- concurrent ranges ----------------
    plan = plan_ranges(size)

    async def one(name, off, length):
        try:
            (got,) = await download(mrd, [(off, length)], read_retry)
        except Exception as exc:
            return name, off, length, None, exc
        return name, off, length, got, None

    # (a) every range as its own concurrent download_ranges() call on one stream
    results = await asyncio.gather(*(one(n, o, l) for n, o, l in plan))
    for name, off, length, got, exc in results:
        label = f"concurrent range [{name}] off={off} len={length}"
        if exc is not None:
            check(label, False, f"{type(exc).__name__}: {exc}")
            continue
        want = expected(src, off, length)
        check(label, got == want, f"{len(got)} bytes" if got == want else describe_mismatch(got, want, off))

    # (b) all ranges in a single download_ranges() call (one request, many read_ids)
    try:
        gots = await download(mrd, [(o, l) for _, o, l in plan], read_retry)
        bad = [
            f"{n}: {describe_mismatch(g, expected(src, o, l), o)}"
            for (n, o, l), g in zip(plan, gots)
            if g != expected(src, o, l)
        ]
        check(f"batched {len(plan)} ranges in one request", not bad, "; ".join(bad) or "all equal")
    except Exception as exc:
        check(f"batched {len(plan)} ranges in one request", False, f"{type(exc).__name__}: {exc}")

    # (c) the stream stays usable for a later sequential read
    if size > 0:
        try:
            (got,) = await download(mrd, [(size // 3, min(12345, size - size // 3))], read_retry)
            want = expected(src, size // 3, min(12345, size - size // 3))
            check("sequential read after concurrent reads", got == want, describe_mismatch(got, want, size // 3))
        except Exception as exc:
            check("sequential read after concurrent reads", False, f"{type(exc).__name__}: {exc}")

    # ---------------- close ----------------
    t0 = time.monotonic()
    try:
        try:
            await asyncio.wait_for(mrd.close(), timeout=CLOSE_TIMEOUT)
        except asyncio.TimeoutError:
            pass
        elapsed = time.monotonic() - t0
        check("close after reads",
              elapsed < CLOSE_TIMEOUT - 1 and not getattr(mrd, "is_stream_open", False),
              f"{elapsed:.2f} s")
    except Exception as exc:
        check("close after reads", False, f"{type(exc).__name__}: {exc}")

    # ---------------- open + close without reads ----------------
    # With no reads in flight the client really half-closes and then waits for
    # one message or end of stream, so the server must finish the stream.
    # (After reads, close() instead cancels the RPC.)
    try:
        mrd1 = await open_mrd(MRD, client, args.bucket, args.object, open_retry)
        # close() swallows CancelledError, so wait_for cannot interrupt it: time it instead.
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(mrd1.close(), timeout=CLOSE_TIMEOUT)
        except asyncio.TimeoutError:
            pass
        elapsed = time.monotonic() - t0
        check("open then close with no reads (server ends stream on half-close)",
              elapsed < CLOSE_TIMEOUT - 1,
              f"{elapsed:.2f} s" if elapsed < CLOSE_TIMEOUT - 1 else
              f"close() hung {elapsed:.0f} s: the server did not end the stream after the client's half-close")
    except Exception as exc:
        check("open then close with no reads (server ends stream on half-close)", False,
              f"{type(exc).__name__}: {exc}")

    # ---------------- error paths ----------------
    if not args.skip_error_checks:
        # Past-the-end range: OUT_OF_RANGE (not retried by the client).
        try:
            mrd2 = await open_mrd(MRD, client, args.bucket, args.object, open_retry)
            try:
                await download(mrd2, [(size + 1024, 10)], read_retry)
                check("range past the end -> OUT_OF_RANGE", False, "no error raised")
            except gexc.OutOfRange as exc:
                check("range past the end -> OUT_OF_RANGE", True, str(exc)[:120])
            except Exception as exc:
                check("range past the end -> OUT_OF_RANGE", False, f"{type(exc).__name__}: {exc}")
            finally:
                if getattr(mrd2, "is_stream_open", False):
                    try:
                        await asyncio.wait_for(mrd2.close(), timeout=CLOSE_TIMEOUT)
                    except Exception:
                        pass
        except Exception as exc:
            check("range past the end -> OUT_OF_RANGE", False, f"open failed: {type(exc).__name__}: {exc}")

        # Missing object: NOT_FOUND at open (not retried by the client).
        missing = f"{args.object}.conformance-missing-{uuid.uuid4().hex[:8]}"
        try:
            mrd3 = await open_mrd(MRD, client, args.bucket, missing, open_retry)
            check("open of a missing object -> NOT_FOUND", False, "open succeeded")
            try:
                await asyncio.wait_for(mrd3.close(), timeout=CLOSE_TIMEOUT)
            except Exception:
                pass
        except gexc.NotFound as exc:
            check("open of a missing object -> NOT_FOUND", True, str(exc)[:120])
        except Exception as exc:
            check("open of a missing object -> NOT_FOUND", False, f"{type(exc).__name__}: {exc}")

    # ---------------- retries / redirects ----------------
    for phase, summary, _ in retry_log.events:
        info(f"client retried ({phase})", summary)
    if args.expect_redirects:
        check(
            "server redirect(s) seen and parsed (ABORTED + BidiReadObjectRedirectedError)",
            retry_log.redirects > 0,
            f"{retry_log.redirects} redirect(s), {len(retry_log.events)} retried error(s)",
        )
    else:
        info("retried errors", f"{len(retry_log.events)} ({retry_log.redirects} redirects)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoint", required=True, help="HOST:PORT of the emulator (plaintext gRPC)")
    ap.add_argument("--bucket", required=True, help="bucket name (without projects/_/buckets/)")
    ap.add_argument("--object", required=True, help="object name")
    ap.add_argument("--source", required=True, help="local file with the object's true bytes")
    ap.add_argument("--expect-redirects", action="store_true",
                    help="require at least one ABORTED/BidiReadObjectRedirectedError the client followed")
    ap.add_argument("--skip-error-checks", action="store_true",
                    help="skip the OUT_OF_RANGE and NOT_FOUND checks")
    ap.add_argument("--timeout", type=float, default=120.0, help="overall timeout in seconds (default 120)")
    ap.add_argument("-v", "--verbose", action="store_true", help="client library logging at DEBUG")
    args = ap.parse_args()

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.ERROR,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        with open(args.source, "rb") as f:
            src = f.read()
    except OSError as exc:
        print(f"FAIL cannot read --source: {exc}", flush=True)
        return 2
    print(f"INFO endpoint={args.endpoint} bucket={args.bucket} object={args.object} "
          f"source={args.source} ({len(src)} bytes)", flush=True)
    try:
        import google.cloud.storage as gcs
        import grpc

        print(f"INFO google-cloud-storage {gcs.__version__}, grpcio {grpc.__version__}, python {sys.version.split()[0]}", flush=True)
    except Exception as exc:
        print(f"FAIL cannot import google-cloud-storage / grpcio: {exc}", flush=True)
        return 2

    global _retry_log
    _retry_log = RetryLog()

    # Hard watchdog: the client swallows cancellation in places, so asyncio.wait_for
    # alone cannot guarantee we never hang.
    def watchdog():
        print(f"FAIL hard timeout: still running {args.timeout + 30:.0f} s after start "
              f"(checks failed so far: {_failures or 'none'})", flush=True)
        os._exit(3)

    timer = threading.Timer(args.timeout + 30, watchdog)
    timer.daemon = True
    timer.start()
    try:
        asyncio.run(asyncio.wait_for(run(args, src), timeout=args.timeout))
    except asyncio.TimeoutError:
        for phase, summary, _ in _retry_log.events[-5:]:
            print(f"INFO client retried ({phase}): {summary}", flush=True)
        print(f"FAIL overall timeout: conformance run exceeded {args.timeout:.0f} s "
              f"(checks failed so far: {_failures or 'none'}; {len(_retry_log.events)} retried "
              "error(s) - note the client retries UNAVAILABLE/INTERNAL/DEADLINE_EXCEEDED/"
              "RESOURCE_EXHAUSTED/ABORTED, e.g. a response message over 4 MiB)", flush=True)
        return 3
    except Exception as exc:
        print(f"FAIL unexpected exception: {type(exc).__name__}: {exc}", flush=True)
        if args.verbose:
            traceback.print_exc()
        return 1
    if _failures:
        print(f"FAIL {len(_failures)} check(s) failed: {', '.join(_failures)}", flush=True)
        return 1
    print("OK   all checks passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
