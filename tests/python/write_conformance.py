#!/usr/bin/env python3
"""Write conformance of the zonalfs gRPC emulator against the official Python client.

Drives google-cloud-storage's asyncio AsyncAppendableObjectWriter (BidiWriteObject,
appendable objects) and AsyncMultiRangeDownloader (BidiReadObject) against an
emulator endpoint over a plaintext channel.

    python write_conformance.py write --endpoint HOST:PORT --bucket B --object O \
        --source PATH [--generation G] [--flush-every BYTES] [--append-calls N] \
        [--finalize] [--whole PATH] [--expect-redirects] [--expect-retries]
    python write_conformance.py read --endpoint HOST:PORT --bucket B --object O --expect PATH
    python write_conformance.py tail --endpoint HOST:PORT --bucket B --object O --source PATH \
        [--pieces N]

write: opens a writer (no --generation: creates, replacing any live object;
  --generation 0: creates only if the object is missing; --generation G: takes
  over the unfinalized generation G), appends the bytes of PATH in N append()
  calls (after each call writer.flush(), unless --flush-every is given, which
  becomes the writer's FLUSH_INTERVAL_BYTES and the only flushing), then
  close(), or with --finalize close(finalize_on_close=True,
  full_object_checksum=crc32c of the whole object). --whole names a file with
  the whole object's bytes after this write (for the checksum of a takeover).
read: reads the whole object with one AsyncMultiRangeDownloader and compares it
  byte for byte with PATH.
tail: creates the object and appends PATH in N pieces; after each flush it reads
  what was persisted so far, with a fresh downloader and with one kept open
  since the first piece, while the object is unfinalized; then closes it
  (unfinalized).

Prints one line per check ("PASS ..." / "FAIL ..." / "INFO ..."), and at the end
one machine-readable line:
    RESULT generation=G size=S finalized=0|1 redirects=R retries=E
Exit codes: 0 ok, 1 check failed, 2 usage/setup error, 3 overall timeout.
Pinned client versions: see requirements.txt next to this file.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import sys
import threading
import traceback

# The read-side helpers of conformance.py (same directory, our own code),
# imported without leaving a __pycache__ in the source tree.
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conformance import (  # noqa: E402
    describe_mismatch,
    import_client_api,
    make_client,
    redirect_info,
)

_failures: list[str] = []
_retry_log = None  # set in main()


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


def result(**fields) -> None:
    print("RESULT " + " ".join(f"{k}={v}" for k, v in fields.items()), flush=True)


def import_writer_api():
    """The writer class, its module (retry predicate) and the redirect parser."""
    from google.cloud.storage.asyncio import async_appendable_object_writer as w_mod
    from google.cloud.storage.asyncio.retry._helpers import (
        _extract_bidi_writes_redirect_proto,
    )

    return w_mod.AsyncAppendableObjectWriter, w_mod, _extract_bidi_writes_redirect_proto


class RetryLog:
    """Every error the client retried, and whether it was a redirect."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, bool]] = []  # (phase, summary, redirect)

    def hook(self, phase: str):
        def on_error(exc):
            redirected = False
            summary = f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
            try:
                _, _, extract = import_writer_api()
                proto = extract(exc)
            except Exception:  # pragma: no cover - defensive
                proto = None
            if proto is not None:
                redirected = True
                summary += (
                    f" [routing_token={proto.routing_token!r} generation={proto.generation}"
                    f" write_handle={'set' if proto.write_handle else None}]"
                )
            else:
                token, handle = redirect_info(exc)  # a read redirect
                if token is not None or handle is not None:
                    redirected = True
                    summary += f" [routing_token={token!r} read_handle={'set' if handle else None}]"
            self.events.append((phase, summary, redirected))

        return on_error

    @property
    def redirects(self) -> int:
        return sum(1 for _, _, r in self.events if r)


def fast_retry(predicate, phase: str | None):
    """The client's retry predicate with a fast backoff and (given a phase) an
    on_error hook."""
    from google.api_core.retry_async import AsyncRetry

    return AsyncRetry(
        predicate=predicate,
        initial=0.05,
        maximum=1.0,
        multiplier=2.0,
        timeout=60.0,
        on_error=_retry_log.hook(phase) if phase else None,
    )


def watch_opens(writer) -> None:
    """Logs every error a writer's (re)open retries. Every open retry policy of
    the writer calls its _on_open_error, including the one it makes itself when
    append() reopens a broken stream (its default policy, not ours), so the
    policies we pass to open/close/finalize carry no hook of their own."""
    original = getattr(writer, "_on_open_error", None)
    if original is None:  # pragma: no cover - another client layout
        info("cannot watch the writer's reopen retries", "no _on_open_error")
        return
    hook = _retry_log.hook("open")

    def on_open_error(exc):
        hook(exc)
        original(exc)

    writer._on_open_error = on_open_error


def crc32c(data: bytes) -> int:
    import google_crc32c

    return google_crc32c.value(data)


def read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise SetupError(f"cannot read {what}: {exc}") from exc


class SetupError(Exception):
    pass


def split(data: bytes, n: int) -> list[bytes]:
    """n nearly equal consecutive pieces (some empty if data is short)."""
    n = max(1, n)
    step, extra = divmod(len(data), n)
    pieces, at = [], 0
    for i in range(n):
        size = step + (1 if i < extra else 0)
        pieces.append(data[at : at + size])
        at += size
    return pieces


def report_retries() -> None:
    for phase, summary, _ in _retry_log.events:
        info(f"client retried ({phase})", summary)
    info("retried errors", f"{len(_retry_log.events)} ({_retry_log.redirects} redirects)")


# --------------------------------------------------------------------------
# write
# --------------------------------------------------------------------------
async def cmd_write(args) -> None:
    src = read_file(args.source, "--source")
    whole = read_file(args.whole, "--whole") if args.whole else None
    Writer, w_mod, _ = import_writer_api()
    AsyncGrpcClient, _, _, _ = import_client_api()
    predicate = w_mod._is_write_retryable
    client = make_client(AsyncGrpcClient, args.endpoint)

    options = {"FLUSH_INTERVAL_BYTES": args.flush_every} if args.flush_every else None
    writer = Writer(client, args.bucket, args.object, generation=args.generation, writer_options=options)
    watch_opens(writer)
    try:
        await writer.open(retry_policy=fast_retry(predicate, None))
    except Exception as exc:
        check("open BidiWriteObject stream", False, f"{type(exc).__name__}: {exc}")
        raise
    check("open BidiWriteObject stream", writer.is_stream_open)
    gen = writer.generation
    check("generation is a positive int", isinstance(gen, int) and gen > 0, f"generation={gen!r}")
    if args.generation:
        check("a takeover keeps the generation", gen == args.generation, f"{gen} (asked {args.generation})")
    start = writer.persisted_size or 0
    if args.generation:
        info("takeover", f"persisted_size at open = {start}")
    else:
        check("a new object starts empty", start == 0, f"persisted_size={start}")
    handle = getattr(writer.write_handle, "handle", b"")
    check("write_handle after open", bool(handle), f"{len(handle)} bytes")
    end = start + len(src)
    if whole is not None:
        check("--whole is what the object becomes", len(whole) == end,
              f"{len(whole)} bytes, object will have {end}")

    sent = start
    for i, piece in enumerate(split(src, args.append_calls)):
        label = f"append {i + 1}/{args.append_calls} ({len(piece)} bytes at {sent})"
        try:
            await writer.append(piece, retry_policy=fast_retry(predicate, "append"))
        except Exception as exc:
            check(label, False, f"{type(exc).__name__}: {exc}")
            raise
        sent += len(piece)
        check(label, writer.offset == sent, f"writer.offset={writer.offset}, want {sent}")
        if not args.flush_every:
            persisted = await writer.flush()
            check(f"flush after append {i + 1}: persisted_size", persisted == sent,
                  f"persisted_size={persisted}, want {sent}")

    finalized = 0
    if args.finalize:
        if whole is not None:
            crc = crc32c(whole)
        elif start == 0:
            crc = crc32c(src)
        else:
            crc = None
            info("finalize without full_object_checksum", "a takeover without --whole")
        try:
            obj = await writer.close(
                finalize_on_close=True,
                full_object_checksum=crc,
                retry_policy=fast_retry(predicate, None),
            )
        except Exception as exc:
            check("close(finalize_on_close=True)", False, f"{type(exc).__name__}: {exc}")
            raise
        check("close(finalize_on_close=True)", True)
        check("finalized object: size", obj.size == end, f"size={obj.size}, want {end}")
        check("finalized object: generation unchanged", obj.generation == gen,
              f"generation={obj.generation}, want {gen}")
        check("finalized object: finalize_time set", bool(obj.finalize_time), f"{obj.finalize_time!r}")
        if crc is not None:
            got = obj.checksums.crc32c if obj.checksums else None
            check("finalized object: checksums.crc32c", got == crc, f"server={got} want={crc}")
        size = obj.size
        finalized = 1
    else:
        try:
            returned = await writer.close(retry_policy=fast_retry(predicate, None))
        except Exception as exc:
            check("close()", False, f"{type(exc).__name__}: {exc}")
            raise
        # close() returns the writer's last known persisted_size (from its last
        # flush or open), not the server's answer to the half-close, which the
        # stream object keeps.
        info("close() returned", f"{returned} (the writer's last known persisted_size)")
        persisted = writer.write_obj_stream.persisted_size
        check("close(): the server's last persisted_size", persisted == end,
              f"persisted_size={persisted}, want {end}")
        size = persisted
    check("stream closed", not writer.is_stream_open)

    report_retries()
    if args.expect_redirects:
        check("write redirect(s) seen and followed (ABORTED + BidiWriteObjectRedirectedError)",
              _retry_log.redirects > 0, f"{_retry_log.redirects} redirect(s)")
    if args.expect_retries:
        check("broken stream(s) retried", len(_retry_log.events) > _retry_log.redirects,
              f"{len(_retry_log.events) - _retry_log.redirects} non-redirect retried error(s)")
    result(generation=gen, size=size, finalized=finalized,
           redirects=_retry_log.redirects, retries=len(_retry_log.events))


# --------------------------------------------------------------------------
# read
# --------------------------------------------------------------------------
async def open_reader(client, bucket, obj):
    _, MRD, mrd_mod, _ = import_client_api()
    return await MRD.create_mrd(
        client, bucket, obj, retry_policy=fast_retry(mrd_mod._is_open_retryable, "read-open")
    )


async def read_range(mrd, off: int, length: int) -> bytes:
    _, _, mrd_mod, _ = import_client_api()
    buf = io.BytesIO()
    await mrd.download_ranges(
        [(off, length, buf)], retry_policy=fast_retry(mrd_mod._is_read_retryable, "read")
    )
    return buf.getvalue()


async def cmd_read(args) -> None:
    want = read_file(args.expect, "--expect")
    AsyncGrpcClient, _, _, _ = import_client_api()
    client = make_client(AsyncGrpcClient, args.endpoint)
    try:
        mrd = await open_reader(client, args.bucket, args.object)
    except Exception as exc:
        check("open BidiReadObject stream", False, f"{type(exc).__name__}: {exc}")
        raise
    check("open BidiReadObject stream", mrd.is_stream_open)
    check("persisted_size == expected size", mrd.persisted_size == len(want),
          f"persisted_size={mrd.persisted_size} expected={len(want)}")
    got = await read_range(mrd, 0, 0) if want else b""
    check("whole object (0, 0) equals --expect", got == want,
          f"{len(got)} bytes" if got == want else describe_mismatch(got, want, 0))
    gen = mrd.generation
    finalized = 1 if mrd.is_finalized else 0
    info("object", f"generation={gen} is_finalized={mrd.is_finalized} (the client sets it only "
         "if finalize_time's seconds-of-minute are > 0)")
    try:
        await asyncio.wait_for(mrd.close(), timeout=15)
    except asyncio.TimeoutError:
        check("close the downloader", False, "timed out")
    report_retries()
    result(generation=gen, size=len(got), finalized=finalized,
           redirects=_retry_log.redirects, retries=len(_retry_log.events))


# --------------------------------------------------------------------------
# tail
# --------------------------------------------------------------------------
async def cmd_tail(args) -> None:
    src = read_file(args.source, "--source")
    Writer, w_mod, _ = import_writer_api()
    AsyncGrpcClient, _, _, _ = import_client_api()
    predicate = w_mod._is_write_retryable
    client = make_client(AsyncGrpcClient, args.endpoint)
    writer = Writer(client, args.bucket, args.object)
    watch_opens(writer)
    await writer.open(retry_policy=fast_retry(predicate, None))
    gen = writer.generation
    check("open BidiWriteObject stream (create)", writer.is_stream_open, f"generation={gen}")

    kept = None  # a downloader opened after the first flush and kept open
    sent = 0
    for i, piece in enumerate(split(src, args.pieces)):
        await writer.append(piece, retry_policy=fast_retry(predicate, "append"))
        sent += len(piece)
        persisted = await writer.flush()
        check(f"piece {i + 1}: flush -> persisted_size", persisted == sent,
              f"persisted_size={persisted}, want {sent}")
        fresh = await open_reader(client, args.bucket, args.object)
        check(f"piece {i + 1}: fresh downloader sees the persisted size",
              fresh.persisted_size == sent and not fresh.is_finalized,
              f"persisted_size={fresh.persisted_size} is_finalized={fresh.is_finalized}")
        got = await read_range(fresh, 0, sent)
        check(f"piece {i + 1}: fresh downloader reads [0, {sent})", got == src[:sent],
              describe_mismatch(got, src[:sent], 0))
        await asyncio.wait_for(fresh.close(), timeout=15)
        if kept is None:
            kept, kept_from = await open_reader(client, args.bucket, args.object), sent
            continue
        # Bytes appended after the downloader opened: the tail of a growing object.
        want = src[kept_from:sent]
        try:
            got = await read_range(kept, kept_from, len(want))
            check(f"piece {i + 1}: downloader opened at {kept_from} reads the new [{kept_from}, {sent})",
                  got == want, describe_mismatch(got, want, kept_from))
        except Exception as exc:
            check(f"piece {i + 1}: downloader opened at {kept_from} reads the new [{kept_from}, {sent})",
                  False, f"{type(exc).__name__}: {exc}")
    if kept is not None:
        await asyncio.wait_for(kept.close(), timeout=15)
    await writer.close()
    persisted = writer.write_obj_stream.persisted_size
    check("close(): persisted_size", persisted == len(src), f"persisted_size={persisted}, want {len(src)}")
    report_retries()
    result(generation=gen, size=persisted, finalized=0,
           redirects=_retry_log.redirects, retries=len(_retry_log.events))


# --------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p):
        p.add_argument("--endpoint", required=True, help="HOST:PORT of the emulator (plaintext gRPC)")
        p.add_argument("--bucket", required=True, help="bucket name (without projects/_/buckets/)")
        p.add_argument("--object", required=True, help="object name")
        p.add_argument("--timeout", type=float, default=120.0, help="overall timeout in seconds (default 120)")
        p.add_argument("-v", "--verbose", action="store_true", help="client library logging at DEBUG")

    w = sub.add_parser("write", help="append a file to an appendable object")
    common(w)
    w.add_argument("--source", required=True, help="local file with the bytes to append")
    w.add_argument("--generation", type=int, default=None,
                   help="0: create only if missing; G: take over generation G (default: create)")
    w.add_argument("--flush-every", type=int, default=None, metavar="BYTES",
                   help="the writer's FLUSH_INTERVAL_BYTES (a multiple of 2 MiB); "
                        "without it, writer.flush() after each append call")
    w.add_argument("--append-calls", type=int, default=1, metavar="N", help="split the source into N append() calls")
    w.add_argument("--finalize", action="store_true", help="close(finalize_on_close=True, full_object_checksum=...)")
    w.add_argument("--whole", default=None, metavar="PATH",
                   help="the whole object's bytes after this write (checksum of a finalizing takeover)")
    w.add_argument("--expect-redirects", action="store_true", help="require at least one followed write redirect")
    w.add_argument("--expect-retries", action="store_true",
                   help="require at least one retried error that was not a redirect")

    r = sub.add_parser("read", help="read the whole object and compare")
    common(r)
    r.add_argument("--expect", required=True, help="local file with the object's expected bytes")

    t = sub.add_parser("tail", help="create, append in pieces and read each persisted prefix")
    common(t)
    t.add_argument("--source", required=True, help="local file with the bytes to append")
    t.add_argument("--pieces", type=int, default=3, help="number of append+flush steps (default 3)")

    args = ap.parse_args()
    if args.cmd == "write" and args.append_calls < 1:
        ap.error("--append-calls must be at least 1")

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.ERROR,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        import google.cloud.storage as gcs
        import grpc

        print(f"INFO {args.cmd} endpoint={args.endpoint} bucket={args.bucket} object={args.object}; "
              f"google-cloud-storage {gcs.__version__}, grpcio {grpc.__version__}, "
              f"python {sys.version.split()[0]}", flush=True)
        import_writer_api()
    except Exception as exc:
        print(f"FAIL cannot import google-cloud-storage / grpcio: {exc}", flush=True)
        return 2

    global _retry_log
    _retry_log = RetryLog()

    # Hard watchdog: the client swallows cancellation in places.
    def watchdog():
        print(f"FAIL hard timeout: still running {args.timeout + 30:.0f} s after start "
              f"(checks failed so far: {_failures or 'none'})", flush=True)
        os._exit(3)

    timer = threading.Timer(args.timeout + 30, watchdog)
    timer.daemon = True
    timer.start()
    run = {"write": cmd_write, "read": cmd_read, "tail": cmd_tail}[args.cmd]
    try:
        asyncio.run(asyncio.wait_for(run(args), timeout=args.timeout))
    except SetupError as exc:
        print(f"FAIL {exc}", flush=True)
        return 2
    except asyncio.TimeoutError:
        for phase, summary, _ in _retry_log.events[-5:]:
            print(f"INFO client retried ({phase}): {summary}", flush=True)
        print(f"FAIL overall timeout: {args.cmd} exceeded {args.timeout:.0f} s "
              f"(checks failed so far: {_failures or 'none'}; {len(_retry_log.events)} retried error(s))",
              flush=True)
        return 3
    except Exception as exc:
        report_retries()
        print(f"FAIL unexpected exception: {type(exc).__name__}: {exc}", flush=True)
        traceback.print_exc()
        return 1
    if _failures:
        print(f"FAIL {len(_failures)} check(s) failed: {', '.join(_failures)}", flush=True)
        return 1
    print("OK   all checks passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
