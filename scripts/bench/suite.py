#!/usr/bin/env python3
"""The zonalfs benchmark suite (issue 6), run by scripts/bench.sh.

One run, the same emulator and the same objects for every measurement, under two
emulator profiles (unshaped loopback; shaped like a remote zonal bucket):

- FUSE ceiling: zonalfs's filesystem over an in-memory object client
  (examples/mem_mount) and the same bytes read from tmpfs;
- raw client ceiling: `zonalfs cat` to /dev/null;
- the mount: dd bs=1M, fio seq 256k, 4 readers on 4 files, 4 threads on quarters
  of one file, fio randread 4k/64k/1M (page cache and direct=1), a skip pattern
  (read 64 MiB, skip 16 MiB), first-byte latency after open, `ls -lR` of 10,000
  objects, peak RSS with 16 readers under --memory-limit;
- the peer: the official Python client (peer_mrd.py, 4 concurrent ranges);
- small files (issue 12), 10,000 objects of 4-256 KiB: the mount read whole by 1
  and 8 reader processes (small_read.py) with the daemon's CPU per file, and the
  peer opening one downloader per object, 1 and 8 in flight (peer_small.py);
  issue 13: one reader in random file order, prefetch across files as the
  daemon counts it, the second epoch against mem_mount's, and (shaped) one
  reader with --prefetch-files 0;
- writes, to an emulator of its own over a tmpfs: `zonalfs cp` of the sequential
  object's bytes, `zonalfs cat` of it back, `dd conv=fsync` into the mount and
  the official Python writer (peer_write.py); a local tree of 2,000 small files
  (4-256 KiB; the shaped profile the first 500) written into the mount by 1
  and 8 writer processes
  (small_write.py) and by the peer as one appendable object a file, 1 and 8 in
  flight (peer_small_write.py); peak RSS of the daemon with 16 `dd` writers
  under --memory-limit.

Each figure is the median of RUNS runs; every mount is fresh (cold page cache) and
is unmounted even when a step fails. Writes docs/benchmarks.md (the suite's
sections) and PNG plots under docs/img/, and prints the summary; with --only
(a partial run) it only prints.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

MiB = 1 << 20
GiB = 1 << 30
PROFILES = {
    "unshaped": [],
    "shaped": ["--latency-ms", "2", "--stream-mbps", "200"],
}
SHAPED_STREAM_MBPS = 200
# What --only can select, in the order they run: the ceilings once, the rest in
# each profile.
SECTIONS = ("ceilings", "sequential", "random", "skip", "firstbyte", "ls", "rss", "smallfiles",
            "writes")
BUCKET = "bench"
BIG_OBJ = "seq/big.bin"  # the sequential object
FETCHED = "zonalfs_bytes_fetched_total"  # the daemon's metric of bytes received
# Prefetch across files, as the daemon counts it (small-file runs).
PREFETCH_METRICS = [
    ("pf_ahead", "zonalfs_prefetch_files_total"),
    ("pf_used", "zonalfs_prefetch_files_used_total"),
    ("pf_wasted", "zonalfs_prefetch_files_wasted_total"),
    ("open_pf", "zonalfs_open_prefetches_total"),
]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mounted(path: Path) -> bool:
    want = str(path)
    with open("/proc/mounts") as f:
        return any(line.split()[1] == want for line in f)


def wait_for(cond, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)


# --------------------------------------------------------------------------
# Processes: the emulator, a zonalfs mount, the in-memory mount.
# --------------------------------------------------------------------------
class Emulator:
    def __init__(self, binary: str, root: Path, flags: list[str]):
        self.p = subprocess.Popen(
            [binary, "emulator", "--root", str(root), "--listen", "127.0.0.1:0",
             "--log-level", "warn", *flags],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        line = self.p.stdout.readline().strip()
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"emulator did not start: {line!r}")
        self.addr = line.removeprefix("listening on ")
        self.endpoint = f"http://{self.addr}"

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


class Mount(contextlib.AbstractContextManager):
    """A foreground mount (zonalfs mount -f, or mem_mount); always detached on exit."""

    def __init__(self, argv: list[str], mnt: Path, metrics_port: int | None = None):
        self.mnt = mnt
        self.metrics_port = metrics_port
        self.p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: mounted(mnt) or self.p.poll() is not None, "the mount")
            if not mounted(mnt):
                raise RuntimeError(f"mount failed: {self.p.stderr.read().strip()}")
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.metrics_port is None:
            return out
        with socket.create_connection(("127.0.0.1", self.metrics_port), timeout=10) as c:
            c.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := c.recv(65536):
                data += chunk
        for line in data.decode().splitlines():
            if line and not line.startswith(("#", "HTTP", " ")) and " " in line:
                k, _, v = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[k] = float(v)
        return out

    def cpu_seconds(self) -> float:
        """The daemon's CPU time so far: utime + stime of /proc/PID/stat (all threads)."""
        with open(f"/proc/{self.p.pid}/stat") as f:
            # After the command name in parentheses, fields[0] is field 3 of proc(5).
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def hwm_kib(self) -> int:
        with open(f"/proc/{self.p.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        return 0

    def __exit__(self, *exc):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        if mounted(self.mnt):
            subprocess.run(["umount", "-l", str(self.mnt)], check=False)
        return False


def timed(argv: list[str], **kw) -> float:
    t0 = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, timeout=600, **kw)
    return time.monotonic() - t0


def output_line(argv: list[str], timeout: float = 600) -> str:
    """The stdout of a helper script; its stderr in the error if it fails."""
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {p.returncode}: {p.stderr.strip()[-2000:]}")
    return p.stdout


def fio(args: list[str]) -> dict:
    out = subprocess.run(["fio", "--output-format=json", *args], check=True,
                         capture_output=True, text=True, timeout=600).stdout
    # fio may print warnings before the JSON.
    return json.loads(out[out.index("{"):])


def fio_read(job: dict) -> dict:
    r = job["read"]
    pct = r.get("clat_ns", {}).get("percentile", {})
    return {
        "mbps": r["bw_bytes"] / 1e6,
        "iops": r["iops"],
        "bytes": r["io_bytes"],
        "p50_us": pct.get("50.000000", 0) / 1000,
        "p99_us": pct.get("99.000000", 0) / 1000,
    }


# --------------------------------------------------------------------------
# The suite.
# --------------------------------------------------------------------------
class Suite:
    def __init__(self, a):
        self.a = a
        self.work = Path(a.work)
        self.root = self.work / "root"
        self.mnt = self.work / "mnt"
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.bin = a.bin
        self.quick = a.quick
        self.sections = a.only or list(SECTIONS)
        self.seq_size = 256 * MiB if a.quick else GiB
        self.multi_size = 64 * MiB if a.quick else 256 * MiB
        self.tree_dirs, self.tree_files = (10, 100) if a.quick else (100, 100)
        # The small-file corpus: dirs × files_per_dir objects; the shaped profile
        # reads the first tenth of the directories (a full pass at 2 ms a round
        # trip would take minutes per run).
        self.small_dirs, self.small_per_dir = (10, 100) if a.quick else (100, 100)
        self.small_dirs_in = {"unshaped": self.small_dirs,
                              "shaped": max(1, self.small_dirs // 10)}
        # The small-file tree the writes section writes: dirs × files_per_dir
        # local files (the same in --quick: the count is what is measured); the
        # shaped profile writes the first quarter of the directories (each file
        # costs round trips at 2 ms).
        self.wsmall_dirs, self.wsmall_per_dir = 20, 100
        self.wsmall_dirs_in = {"unshaped": self.wsmall_dirs,
                               "shaped": max(1, self.wsmall_dirs // 4)}
        self.wsmall = self.work / "small-write-src"
        self.rand_secs = 2 if a.quick else 4
        self.runs = a.runs
        self.results: dict = {"profiles": {}}

    # ---- data ----
    def make_data(self) -> None:
        b = self.root / BUCKET
        if (b / ".complete").exists():
            return
        log("writing sample objects")
        (b / "seq").mkdir(parents=True, exist_ok=True)
        (b / "multi").mkdir(exist_ok=True)
        (b / "first").mkdir(exist_ok=True)
        rnd = open("/dev/urandom", "rb")

        def fill(path: Path, size: int) -> None:
            with open(path, "wb") as f:
                left = size
                while left:
                    n = min(left, 8 * MiB)
                    f.write(rnd.read(n))
                    left -= n

        fill(b / "seq" / "big.bin", self.seq_size)
        for i in range(16):
            # 4 files for the 4-reader test; all 16 for the 16-reader RSS test.
            fill(b / "multi" / f"f{i:02}.bin", self.multi_size if i < 4 else self.multi_size // 4)
        for i in range(16):
            fill(b / "first" / f"c{i:02}.bin", 4 * MiB)
        small = rnd.read(1024)
        for d in range(self.tree_dirs):
            dd = b / "tree" / f"d{d:03}"
            dd.mkdir(parents=True, exist_ok=True)
            for f in range(self.tree_files):
                (dd / f"f{f:03}.txt").write_bytes(small)
        # The small-file corpus (an image set): sizes log-uniform over 4-256 KiB,
        # from a fixed seed, so every run reads the same sizes.
        sizes = random.Random(12)
        for d in range(self.small_dirs):
            dd = b / "small" / f"d{d:03}"
            dd.mkdir(parents=True, exist_ok=True)
            for f in range(self.small_per_dir):
                fill(dd / f"f{f:04}.jpg", round(4096 * 64 ** sizes.random()))
        (b / ".complete").write_text("")

    def small_corpus(self, dirs: int) -> list[tuple[str, int]]:
        """The first `dirs` directories of the small-file corpus, from the local
        tree: (object name, size) in the order small_read.py lists them."""
        out = []
        for d in range(dirs):
            dd = self.root / BUCKET / "small" / f"d{d:03}"
            for e in sorted(os.scandir(dd), key=lambda e: e.name):
                out.append((f"small/d{d:03}/{e.name}", e.stat().st_size))
        return out

    def small_write_tree(self) -> None:
        """The local tree the writes section copies in: dirs × files_per_dir
        files, sizes log-uniform over 4-256 KiB from a fixed seed (as the
        small-file corpus), written once."""
        if (self.wsmall / ".complete").exists():
            return
        log(f"writing the local small-file tree ({self.wsmall_dirs * self.wsmall_per_dir} files)")
        sizes = random.Random(14)
        with open("/dev/urandom", "rb") as rnd:
            for d in range(self.wsmall_dirs):
                dd = self.wsmall / f"d{d:03}"
                dd.mkdir(parents=True, exist_ok=True)
                for f in range(self.wsmall_per_dir):
                    (dd / f"f{f:04}.jpg").write_bytes(rnd.read(round(4096 * 64 ** sizes.random())))
        (self.wsmall / ".complete").write_text("")

    def small_write_bytes(self, dirs: int) -> tuple[int, int]:
        """Files and bytes in the first `dirs` directories of the local tree."""
        sizes = [e.stat().st_size for d in range(dirs)
                 for e in os.scandir(self.wsmall / f"d{d:03}")]
        return len(sizes), sum(sizes)

    def mount(self, emu: Emulator, *extra: str) -> Mount:
        port = free_port()
        return Mount([self.bin, "mount", "-f", BUCKET, str(self.mnt), "--endpoint",
                      emu.endpoint, "--anonymous", "--log-level", "warn",
                      "--metrics-addr", f"127.0.0.1:{port}", *extra], self.mnt, port)

    def repeat(self, fn, runs: int | None = None) -> list:
        return [fn() for _ in range(runs or self.runs)]

    # ---- profile-independent ceilings ----
    def ceilings(self) -> dict:
        out = {}
        big = self.mnt / "big.bin"  # mem_mount serves bench/seq/ as its root
        log("FUSE ceiling: zonalfs's filesystem over an in-memory client")

        def mem_dd() -> float:
            with Mount([self.a.mem_mount, str(self.root / BUCKET / "seq"), str(self.mnt)], self.mnt):
                s = timed(["dd", f"if={big}", "of=/dev/null", "bs=1M"], stderr=subprocess.DEVNULL)
            return self.seq_size / s / 1e6

        mem_dd()  # warm-up: the first mount pays for loading objects into memory
        out["fuse_mem"] = self.repeat(mem_dd)
        log("tmpfs ceiling")
        tmp = self.work / "tmpfs"
        tmp.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.seq_size + 64 * MiB}",
                        "zonalfs-bench", str(tmp)], check=True)
        try:
            subprocess.run(["cp", str(self.root / BUCKET / "seq" / "big.bin"), str(tmp)], check=True)
            out["tmpfs"] = self.repeat(lambda: self.seq_size / timed(
                ["dd", f"if={tmp}/big.bin", "of=/dev/null", "bs=1M"],
                stderr=subprocess.DEVNULL) / 1e6)
        finally:
            subprocess.run(["umount", "-l", str(tmp)], check=False)
        return out

    # ---- one profile ----
    def profile(self, name: str, flags: list[str]) -> dict:
        log(f"profile {name}: emulator {' '.join(flags) or '(unshaped)'}")
        r: dict = {"flags": flags}
        emu = Emulator(self.bin, self.root, flags)
        try:
            self.profile_on(name, emu, r)
        finally:
            emu.stop()
        return r

    def cat(self, emu: Emulator) -> list[str]:
        """The raw client reading the sequential object to stdout."""
        return [self.bin, "cat", f"gs://{BUCKET}/{BIG_OBJ}", "--endpoint", emu.endpoint, "--anonymous"]

    def profile_on(self, name: str, emu: Emulator, r: dict) -> None:
        timed(self.cat(emu))  # warm the emulator's page cache
        log("emulator round trip (4 KiB ranges through the pool)")
        line = subprocess.run([self.a.engine_bench, emu.endpoint, BUCKET, BIG_OBJ, "rtt"],
                              check=True, capture_output=True, text=True, timeout=300).stdout
        r["rtt_us"] = float(re.search(r"p50_us=(\d+)", line).group(1))
        flags = PROFILES[name]
        r["latency_ms"] = float(flags[flags.index("--latency-ms") + 1]) if "--latency-ms" in flags else 0.0
        steps = {
            "sequential": self.sequential,
            "random": self.random_reads,
            "skip": self.skip_pattern,
            "firstbyte": self.first_byte,
            "ls": self.listing,
            "rss": self.rss16,
            "smallfiles": self.small_files,
            "writes": self.writes,
        }
        for section, step in steps.items():
            if section in self.sections:
                step(name, emu, r)

    def dd(self, emu: Emulator, cpu: list | None = None) -> float:
        """MB/s of `dd bs=1M` through a fresh mount; appends the daemon's CPU
        seconds per GiB read to `cpu` when given."""
        with self.mount(emu) as m:
            cpu0 = m.cpu_seconds()
            s = timed(["dd", f"if={self.mnt / BIG_OBJ}", "of=/dev/null", "bs=1M"],
                      stderr=subprocess.DEVNULL)
            if cpu is not None:
                cpu.append((m.cpu_seconds() - cpu0) / (self.seq_size / 2**30))
        return self.seq_size / s / 1e6

    def cat_run(self, emu: Emulator, cpu: list) -> float:
        """MB/s of the raw client; appends its CPU seconds per GiB to `cpu`."""
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        s = timed(self.cat(emu))
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        cpu.append(used / (self.seq_size / 2**30))
        return self.seq_size / s / 1e6

    def fio_on_mount(self, emu: Emulator, args: list[str], extra: tuple = ()) -> dict:
        with self.mount(emu, *extra) as m:
            before = m.metrics()
            res = fio_read(fio(args)["jobs"][0])
            after = m.metrics()
        for key, metric in (("fetched", FETCHED),
                            ("delivered", "zonalfs_bytes_read_total")):
            res[key] = after.get(metric, 0) - before.get(metric, 0)
        return res

    def sequential(self, name: str, emu: Emulator, r: dict) -> None:
        big = self.mnt / BIG_OBJ
        # The headline ratio: the raw client and the mount alternate, so both
        # see the same machine (a shared 2-vCPU VM drifts), after one untimed
        # mount that warms the emulator's state for the object.
        log("raw client (zonalfs cat) and mount (dd bs=1M), alternating")
        self.dd(emu)
        r["raw"], r["dd"], r["raw_cpu"], r["dd_cpu"] = [], [], [], []
        for _ in range(self.runs):
            r["raw"].append(self.cat_run(emu, r["raw_cpu"]))
            r["dd"].append(self.dd(emu, r["dd_cpu"]))

        log("mount: fio sequential bs=256k")
        r["fio_seq"] = [x["mbps"] for x in self.repeat(lambda: self.fio_on_mount(
            emu, ["--name=seq", f"--filename={big}", "--rw=read", "--bs=256k", "--ioengine=psync"]))]

        log("mount: 4 readers on 4 files")
        files = [self.mnt / "multi" / f"f{i:02}.bin" for i in range(4)]
        four = ["--group_reporting", "--rw=read", "--bs=1M", "--ioengine=psync"]
        for i, f in enumerate(files):
            four += [f"--name=r{i}", f"--filename={f}"]
        r["four_files"] = [x["mbps"] for x in self.repeat(lambda: self.fio_on_mount(emu, four))]

        log("mount: 4 threads on quarters of one file")
        q = self.seq_size // 4
        r["quarters"] = [x["mbps"] for x in self.repeat(lambda: self.fio_on_mount(
            emu, ["--name=q", f"--filename={big}", "--rw=read", "--bs=1M", "--ioengine=psync",
                  "--numjobs=4", f"--size={q}", f"--offset_increment={q}", "--thread",
                  "--group_reporting"]))]

        log("peer: official Python client, 4 concurrent ranges")

        def peer() -> float:
            line = subprocess.run(
                [self.a.python, str(Path(__file__).with_name("peer_mrd.py")), "--endpoint",
                 emu.addr, "--bucket", BUCKET, "--object", BIG_OBJ, "--size", str(self.seq_size)],
                check=True, capture_output=True, text=True, timeout=600).stdout
            return float(re.search(r"mbps=(\d+)", line).group(1))

        r["peer"] = self.repeat(peer)

    def random_reads(self, name: str, emu: Emulator, r: dict) -> None:
        big = self.mnt / BIG_OBJ
        r["rand"] = {}
        for bs in ("4k", "64k", "1M"):
            for direct in (0, 1):
                key = f"{bs} {'direct' if direct else 'page cache'}"
                log(f"mount: fio randread {key}")
                runs = self.repeat(lambda: self.fio_on_mount(
                    emu, ["--name=rand", f"--filename={big}", "--rw=randread", f"--bs={bs}",
                          f"--direct={direct}", "--ioengine=psync", f"--runtime={self.rand_secs}",
                          "--time_based", "--norandommap", "--randrepeat=0"]))
                r["rand"][key] = {
                    "mbps": median([x["mbps"] for x in runs]),
                    "iops": median([x["iops"] for x in runs]),
                    "p50_us": median([x["p50_us"] for x in runs]),
                    "p99_us": median([x["p99_us"] for x in runs]),
                    "fetched_ratio": median([x["fetched"] / max(1, x["bytes"]) for x in runs]),
                    "fetched_per_daemon_byte": median(
                        [x["fetched"] / max(1, x["delivered"]) for x in runs]),
                }

    def skip_pattern(self, name: str, emu: Emulator, r: dict) -> None:
        log("mount: skip pattern (read 64 MiB, skip 16 MiB)")
        big = self.mnt / BIG_OBJ

        def skip() -> dict:
            with self.mount(emu) as m:
                before = m.metrics()
                t0 = time.monotonic()
                got = 0
                with open(big, "rb", buffering=0) as f:
                    off = 0
                    while off < self.seq_size:
                        f.seek(off)
                        left = 64 * MiB
                        while left and (b := f.read(min(MiB, left))):
                            got += len(b)
                            left -= len(b)
                        off += 80 * MiB
                secs = time.monotonic() - t0
                after = m.metrics()
            fetched = after.get(FETCHED, 0) - before.get(FETCHED, 0)
            return {"mbps": got / secs / 1e6, "fetched_ratio": fetched / max(1, got)}

        runs = self.repeat(skip)
        r["skip"] = {"mbps": [x["mbps"] for x in runs],
                     "fetched_ratio": median([x["fetched_ratio"] for x in runs])}

    def first_byte(self, name: str, emu: Emulator, r: dict) -> None:
        log("mount: first-byte latency after open")

        # Each file is measured on a quiet machine: opening a small file
        # fetches it whole, and on two shared cores the next file's open
        # measured back to back would wait for that transfer's CPU (a
        # throughput figure the small-file runs already give), not latency.
        def once() -> tuple[float, float, float]:
            opens, firsts, both = [], [], []
            with self.mount(emu):
                for i in range(16):
                    p = self.mnt / "first" / f"c{i:02}.bin"
                    t0 = time.monotonic()
                    fd = os.open(p, os.O_RDONLY)
                    t1 = time.monotonic()
                    os.read(fd, 4096)
                    t2 = time.monotonic()
                    os.close(fd)
                    opens.append((t1 - t0) * 1e6)
                    firsts.append((t2 - t1) * 1e6)
                    both.append((t2 - t0) * 1e6)
                    time.sleep(0.05)
            return median(opens), median(firsts), median(both)

        runs = self.repeat(once)
        r["open_us"] = median([x[0] for x in runs])
        r["first_byte_us"] = median([x[1] for x in runs])
        r["open_first_us"] = median([x[2] for x in runs])

    def listing(self, name: str, emu: Emulator, r: dict) -> None:
        log(f"mount: ls -lR over {self.tree_dirs * self.tree_files} objects")

        def ls() -> tuple[float, float]:
            with self.mount(emu):
                cold = timed(["ls", "-lR", str(self.mnt / "tree")])
                warm = timed(["ls", "-lR", str(self.mnt / "tree")])
            return cold, warm

        runs = self.repeat(ls)
        r["ls_cold_s"] = median([x[0] for x in runs])
        r["ls_warm_s"] = median([x[1] for x in runs])
        r["ls_objects"] = self.tree_dirs * self.tree_files

    def rss16(self, name: str, emu: Emulator, r: dict) -> None:
        log("mount: peak RSS with 16 concurrent readers")
        limit = self.a.memory_limit_mib
        sixteen = ["--group_reporting", "--rw=read", "--bs=1M", "--ioengine=psync", "--thread"]
        for i in range(16):
            sixteen += [f"--name=r{i}", f"--filename={self.mnt / 'multi' / f'f{i:02}.bin'}"]
        with self.mount(emu, "--memory-limit", f"{limit}MiB") as m:
            res = fio_read(fio(sixteen)["jobs"][0])
            r["rss16"] = {"hwm_mib": m.hwm_kib() / 1024, "limit_mib": limit,
                          "mbps": res["mbps"],
                          "budget_peak_mib": m.metrics().get(
                              'zonalfs_memory_bytes{kind="peak"}', 0) / MiB}

    def small_files(self, name: str, emu: Emulator, r: dict) -> None:
        dirs = self.small_dirs_in[name]
        corpus = self.small_corpus(dirs)
        files, size = len(corpus), sum(n for _, n in corpus)
        manifest = self.work / f"small-{name}.tsv"
        manifest.write_text("".join(f"{o}\t{n}\n" for o, n in corpus))
        roots = [str(self.mnt / "small" / f"d{d:03}") for d in range(dirs)]
        # The FUSE ceiling serves the same directories from memory: mem_mount
        # loads every file under the tree it is given, here a tree of links to
        # just the directories this profile reads (named dNNN at its root).
        mem_tree = self.work / f"mem-small-{name}"
        mem_tree.mkdir(exist_ok=True)
        for d in range(dirs):
            link = mem_tree / f"d{d:03}"
            if not link.is_symlink():
                link.symlink_to(self.root / BUCKET / "small" / f"d{d:03}")
        mem_roots = [str(self.mnt / f"d{d:03}") for d in range(dirs)]
        here = Path(__file__).parent

        def checked(line: str, what: str) -> dict[str, float]:
            got = {k: float(v) for k, v in re.findall(r"(\w+)=([\d.]+)", line)}
            if got.get("files") != files or got.get("bytes") != size:
                raise RuntimeError(f"{what} read {line.strip()!r}; want files={files} bytes={size}")
            return got

        def mount_read(m: Mount, procs: int, order: str = "listing",
                       dirs_read: list[str] = roots) -> dict:
            before, cpu0 = m.metrics(), m.cpu_seconds()
            line = subprocess.run([self.a.python, str(here / "small_read.py"), "--procs",
                                   str(procs), "--order", order, *dirs_read], check=True,
                                  capture_output=True, text=True, timeout=600).stdout
            cpu = m.cpu_seconds() - cpu0
            after = m.metrics()
            got = checked(line, f"small_read.py --procs {procs} --order {order}")
            out = {"files_s": files / got["seconds"], "mbps": size / got["seconds"] / 1e6,
                   "cpu_us": cpu / files * 1e6, "list_s": got["list_seconds"]}
            if m.metrics_port is not None:  # a zonalfs mount (mem_mount has no metrics)
                out["fetched_ratio"] = (after.get(FETCHED, 0) - before.get(FETCHED, 0)) / size
                for key, metric in PREFETCH_METRICS:
                    out[key] = after.get(metric, 0) - before.get(metric, 0)
            return out

        def mount_epochs(procs: int, epochs: int, *extra: str, order: str = "listing") -> list[dict]:
            with self.mount(emu, *extra) as m:
                return [mount_read(m, procs, order) for _ in range(epochs)]

        def mem_epochs(procs: int, epochs: int) -> list[dict]:
            with Mount([self.a.mem_mount, str(mem_tree), str(self.mnt)], self.mnt) as m:
                return [mount_read(m, procs, dirs_read=mem_roots) for _ in range(epochs)]

        def peer(concurrency: int) -> dict:
            line = subprocess.run([self.a.python, str(here / "peer_small.py"), "--endpoint",
                                   emu.addr, "--bucket", BUCKET, "--manifest", str(manifest),
                                   "--concurrency", str(concurrency)], check=True,
                                  capture_output=True, text=True, timeout=600).stdout
            got = checked(line, f"peer_small.py --concurrency {concurrency}")
            return {"files_s": files / got["seconds"], "mbps": size / got["seconds"] / 1e6}

        # Each step of a run, in the order they alternate: key(s) it fills, and
        # how. Without prefetch across files only in the shaped profile (where
        # the feature has round trips to hide).
        steps = [
            (("mount1",), lambda: mount_epochs(1, 1)),
            (("mount8", "mount8_warm"), lambda: mount_epochs(8, 2)),
            (("mount1_random",), lambda: mount_epochs(1, 1, order="random")),
            (("peer1",), lambda: [peer(1)]),
            (("peer8",), lambda: [peer(8)]),
            (("mem8", "mem8_warm"), lambda: mem_epochs(8, 2)),
        ]
        if name == "shaped":
            steps.insert(1, (("mount1_nopf",), lambda: mount_epochs(1, 1, "--prefetch-files", "0")))
        log(f"small files: {files} objects in {dirs} directories: mount (1 and 8 readers, "
            "1 in random order), peer (1 and 8 in flight), FUSE ceiling (8 readers), alternating")
        t0 = time.monotonic()
        mount_epochs(8, 1)  # warm-up: the emulator's state for every object
        secs = {"warm-up": time.monotonic() - t0}
        runs: dict[str, list] = {k: [] for keys, _ in steps for k in keys}
        for _ in range(self.runs):
            for keys, step in steps:
                t0 = time.monotonic()
                for k, res in zip(keys, step(), strict=True):
                    runs[k].append(res)
                secs[keys[0]] = secs.get(keys[0], 0) + time.monotonic() - t0
        log("small files: seconds per step (all runs): "
            + ", ".join(f"{k} {v:.1f}" for k, v in secs.items()))
        r["small"] = {"files": files, "bytes": size, "dirs": dirs, "step_seconds": secs, **runs}

    def writes(self, name: str, emu: Emulator, r: dict) -> None:
        """`zonalfs cp` of the sequential object's bytes (a local file, warm in
        the page cache) to a new appendable object, finalized; `zonalfs cat`
        of it back; the official Python writer uploading the same file.
        Alternating, so all three see the same machine. The objects are
        written to an emulator of their own over a tmpfs: on the suite's disk
        the emulator's page-cache writeback, not the protocol, set the pace
        (runs of one sitting differed 3x).

        Then, on the same emulator: a local tree of small files written
        through the mount and by the peer (small_writes), and the daemon's peak
        RSS with 16 `dd` writers under --memory-limit (rss16_writes)."""
        log("writes: zonalfs cp, zonalfs cat of it back, the official Python writer, alternating")
        src = self.root / BUCKET / BIG_OBJ
        tmp = self.work / "write-root"
        tmp.mkdir(exist_ok=True)
        self.small_write_tree()
        _, small_bytes = self.small_write_bytes(self.wsmall_dirs)
        # Room for every object written and a staged new generation beside
        # each (a tmpfs near its limit slowed writes 3x): the small-file runs
        # remove their copy after each run, the 16 writers' objects (appendable,
        # not staged) stay until all are checked; twice their size, for slack.
        room = 6 * self.seq_size + 256 * MiB + 2 * small_bytes + 2 * 16 * self.multi_size
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={room}",
                        "zonalfs-bench-writes", str(tmp)], check=True, timeout=60)
        wemu = None
        try:
            (tmp / BUCKET / "written").mkdir(parents=True)
            wemu = Emulator(self.bin, tmp, r["flags"])
            url = f"gs://{BUCKET}/written/up.bin"
            ep = ["--endpoint", wemu.endpoint, "--anonymous"]
            gib = self.seq_size / 2**30
            w = {"cp": [], "cp_cpu": [], "cat_back": [], "peer": [], "dd": [], "dd_cpu": []}
            for _ in range(self.runs):
                # Through the mount: dd of the same bytes into a new file,
                # fsynced at the end (what the mount persisted is counted).
                with self.mount(wemu) as m:
                    cpu0 = m.cpu_seconds()
                    s = timed(["dd", f"if={src}", f"of={self.mnt / 'written' / 'dd.bin'}",
                               "bs=1M", "conv=fsync"], stderr=subprocess.DEVNULL)
                    w["dd_cpu"].append((m.cpu_seconds() - cpu0) / gib)
                w["dd"].append(self.seq_size / s / 1e6)
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                s = timed([self.bin, "cp", str(src), url, *ep], stderr=subprocess.DEVNULL)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                w["cp"].append(self.seq_size / s / 1e6)
                w["cp_cpu"].append(((after.ru_utime - before.ru_utime)
                                    + (after.ru_stime - before.ru_stime)) / gib)
                w["cat_back"].append(self.seq_size / timed([self.bin, "cat", url, *ep]) / 1e6)
                line = subprocess.run(
                    [self.a.python, str(Path(__file__).with_name("peer_write.py")), "--endpoint",
                     wemu.addr, "--bucket", BUCKET, "--object", "written/peer.bin",
                     "--source", str(src)],
                    check=True, capture_output=True, text=True, timeout=600).stdout
                w["peer"].append(float(re.search(r"mbps=(\d+)", line).group(1)))
            w["small"] = self.small_writes(name, wemu, tmp)
            w["rss16w"] = self.rss16_writes(wemu, tmp)
            r["writes"] = w
        finally:
            if wemu is not None:
                wemu.stop()
            subprocess.run(["umount", "-l", str(tmp)], check=False, timeout=60)

    def small_writes(self, name: str, wemu: Emulator, tmp: Path) -> dict:
        """Files/s and MB/s writing the local small-file tree: through a fresh
        mount by 1 and 8 writer processes (small_write.py: open, write whole,
        close; the daemon persists each file at its close), and by the peer,
        one appendable object a file finalized at close, 1 and 8 in flight
        (peer_small_write.py). Alternating; each run writes under a new
        directory, which is checked in the emulator's tree (every file there,
        with the tree's bytes, while the mount is still up) and then removed."""
        dirs = self.wsmall_dirs_in[name]
        files, size = self.small_write_bytes(dirs)
        srcs = [str(self.wsmall / f"d{d:03}") for d in range(dirs)]
        here = Path(__file__).parent
        stored = tmp / BUCKET / "written"

        def checked(line: str, dest: str, what: str) -> dict[str, float]:
            got = {k: float(v) for k, v in re.findall(r"(\w+)=([\d.]+)", line)}
            have = [f.stat().st_size for f in (stored / dest).rglob("*") if f.is_file()]
            if (got.get("files") != files or got.get("bytes") != size
                    or len(have) != files or sum(have) != size):
                raise RuntimeError(f"{what} wrote {line.strip()!r}; the emulator holds {len(have)} "
                                   f"objects, {sum(have)} bytes under written/{dest}; want "
                                   f"files={files} bytes={size}")
            return got

        def mount_write(run: int, procs: int) -> dict:
            dest = f"small-{run}-mount{procs}"
            try:
                with self.mount(wemu) as m:
                    cpu0 = m.cpu_seconds()
                    line = output_line(
                        [self.a.python, str(here / "small_write.py"), "--procs", str(procs),
                         "--dest", str(self.mnt / "written" / dest), *srcs])
                    cpu = m.cpu_seconds() - cpu0
                    got = checked(line, dest, f"small_write.py --procs {procs}")
            finally:
                shutil.rmtree(stored / dest, ignore_errors=True)
            return {"files_s": files / got["seconds"], "mbps": size / got["seconds"] / 1e6,
                    "cpu_us": cpu / files * 1e6, "mkdir_s": got["mkdir_seconds"]}

        def peer(run: int, concurrency: int) -> dict:
            dest = f"small-{run}-peer{concurrency}"
            try:
                line = output_line(
                    [self.a.python, str(here / "peer_small_write.py"), "--endpoint", wemu.addr,
                     "--bucket", BUCKET, "--prefix", f"written/{dest}",
                     "--concurrency", str(concurrency), *srcs])
                got = checked(line, dest, f"peer_small_write.py --concurrency {concurrency}")
            finally:
                shutil.rmtree(stored / dest, ignore_errors=True)
            return {"files_s": files / got["seconds"], "mbps": size / got["seconds"] / 1e6}

        steps = [
            ("mount1", lambda run: mount_write(run, 1)),
            ("mount8", lambda run: mount_write(run, 8)),
            ("peer1", lambda run: peer(run, 1)),
            ("peer8", lambda run: peer(run, 8)),
        ]
        log(f"writes: {files} small files ({size / 1e6:.0f} MB) in {dirs} directories: mount "
            "(1 and 8 writers), peer (1 and 8 in flight), alternating")
        runs: dict[str, list] = {k: [] for k, _ in steps}
        secs: dict[str, float] = {}
        for run in range(self.runs):
            for key, step in steps:
                t0 = time.monotonic()
                runs[key].append(step(run))
                secs[key] = secs.get(key, 0) + time.monotonic() - t0
        log("writes, small files: seconds per step (all runs): "
            + ", ".join(f"{k} {v:.1f}" for k, v in secs.items()))
        return {"files": files, "bytes": size, "dirs": dirs, "step_seconds": secs, **runs}

    def rss16_writes(self, wemu: Emulator, tmp: Path) -> dict:
        """The daemon's peak RSS (VmHWM) with 16 concurrent `dd bs=1M
        conv=fsync` writers, each copying the same local file (bench/multi/
        f00.bin of the read emulator's tree, warm in the page cache) into a new
        file of a fresh mount under --memory-limit; one run. Each object's size
        is checked in the emulator's tree, then the objects are removed."""
        limit = self.a.write_memory_limit_mib
        src = self.root / BUCKET / "multi" / "f00.bin"
        size = src.stat().st_size
        names = [f"w{i:02}.bin" for i in range(16)]
        log(f"writes: peak RSS with 16 dd writers of {size // MiB} MiB, --memory-limit {limit}MiB")
        try:
            with self.mount(wemu, "--memory-limit", f"{limit}MiB") as m:
                t0 = time.monotonic()
                procs = [subprocess.Popen(["dd", f"if={src}", f"of={self.mnt / 'written' / n}",
                                           "bs=1M", "conv=fsync"], stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                          text=True) for n in names]
                try:
                    deadline = t0 + 600
                    for p in procs:
                        p.wait(timeout=max(1.0, deadline - time.monotonic()))
                finally:
                    for p in procs:
                        if p.poll() is None:
                            p.kill()
                            p.wait()
                secs = time.monotonic() - t0
                if failed := [(n, p.stderr.read().strip()) for n, p in zip(names, procs)
                              if p.returncode != 0]:
                    raise RuntimeError(f"dd into the mount failed: {failed}")
                for p in procs:
                    p.stderr.close()
                hwm_mib = m.hwm_kib() / 1024
                budget_peak = m.metrics().get('zonalfs_memory_bytes{kind="peak"}', 0) / MiB
                have = {n: (tmp / BUCKET / "written" / n).stat().st_size for n in names}
                if wrong := {n: s for n, s in have.items() if s != size}:
                    raise RuntimeError(f"16 writers: objects of the wrong size {wrong}; want {size}")
        finally:
            for n in names:
                (tmp / BUCKET / "written" / n).unlink(missing_ok=True)
        return {"hwm_mib": hwm_mib, "limit_mib": limit, "budget_peak_mib": budget_peak,
                "mbps": 16 * size / secs / 1e6, "size_mib": size / MiB, "seconds": secs}

    def run(self) -> dict:
        self.make_data()
        t0 = time.monotonic()
        if "ceilings" in self.sections:
            self.results["ceilings"] = self.ceilings()
        if set(self.sections) - {"ceilings"}:
            for name, flags in PROFILES.items():
                self.results["profiles"][name] = self.profile(name, flags)
        self.results["seconds"] = time.monotonic() - t0
        self.results["quick"] = self.quick
        self.results["seq_size"] = self.seq_size
        self.results["runs"] = self.runs
        self.results["sections"] = self.sections
        self.results["small_per_dir"] = self.small_per_dir
        return self.results


# --------------------------------------------------------------------------
# Report: markdown and plots.
# --------------------------------------------------------------------------
def verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def fmt(xs) -> str:
    return ", ".join(f"{x:.0f}" for x in xs)


def spread(xs) -> float:
    """max / min across runs."""
    return max(xs) / min(xs) if xs and min(xs) > 0 else float("nan")


def ratio_row(label: str, value: float, target: str = "", ok: bool | None = None,
              spec: str = ".2f") -> str:
    return f"| {label} | {value:{spec}} | {target} | {verdict(ok) if ok is not None else ''} |"


def report(res: dict, machine: str, pool_streams: int) -> str:
    size_mib = res["seq_size"] // MiB
    partial = res["sections"] != list(SECTIONS)
    lines = [
        "## The suite (`scripts/bench.sh`)",
        "",
        machine,
        f"One run of {res['seconds'] / 60:.1f} minutes; every figure is the median of "
        f"{res['runs']} runs (MB/s unless marked); every mount is fresh (cold page cache). "
        f"The sequential object is {size_mib} MiB."
        + (" **Quick mode: smaller objects, not for comparison.**" if res["quick"] else "")
        + (f" **Partial run: only {', '.join(res['sections'])}.**" if partial else ""),
        "",
    ]
    if c := res.get("ceilings"):
        lines += [
            "FUSE ceilings (no network): zonalfs's filesystem over an in-memory object client "
            f"(`examples/mem_mount`, `dd bs=1M`): **{median(c['fuse_mem']):.0f}** "
            f"(runs {fmt(c['fuse_mem'])}); tmpfs: **{median(c['tmpfs']):.0f}** (runs {fmt(c['tmpfs'])}).",
            "",
        ]
    if "small" in res["profiles"].get("unshaped", {}):
        lines += small_files_intro(res)
    for name, r in res["profiles"].items():
        lines += profile_report(name, r, res, pool_streams)
        if not partial:
            lines += [f"![{name}](img/bench-{name}.png)", ""]
    return "\n".join(lines)


def small_files_intro(res: dict) -> list[str]:
    full = res["profiles"]["unshaped"]["small"]
    shaped = res["profiles"].get("shaped", {}).get("small")
    text = [
        f"Small files, like an image corpus: {full['files']} objects of 4–256 KiB under `small/` "
        f"(sizes log-uniform from a fixed seed; {full['bytes'] / 1e6:.0f} MB in all) in "
        f"{full['dirs']} directories of {res['small_per_dir']} (`small/dNNN/fNNNN.jpg`).",
        "The mount's reader, `scripts/bench/small_read.py`, lists the directories through the "
        "mount (`os.scandir`, sorted by name) and forks 1 or 8 reader processes; reader k of 8 "
        "takes files k, k+8, k+16, … of the listing (an interleaved split) and opens, reads "
        "whole (1 MiB reads to end of file) and closes each. Its files/s and MB/s cover the "
        "listing and the reading.",
        "Each run is on a fresh mount (cold: nothing cached by the kernel or the daemon; the "
        "emulator warmed by one untimed pass); the 8-reader run then reads everything again on "
        "the same mount (the second epoch, warm).",
        "Daemon CPU per file: the mount process's utime + stime (`/proc/PID/stat`, 10 ms ticks) "
        "across the read, divided by the files read; fetched / read: the daemon's bytes "
        "received (`zonalfs_bytes_fetched_total`) over the bytes the readers read.",
        "The peer, `scripts/bench/peer_small.py`, is the official Python client reading each "
        "object as gcsfs reads a zonal file it opens: one AsyncMultiRangeDownloader per object "
        "(BidiReadObject opened, one whole-object range, closed), 1 or 8 objects in flight "
        "(asyncio tasks in one process), names and sizes known beforehand (no listing).",
        "Random file order: the same reader with the whole listing shuffled first (a fixed "
        "seed), one reader on a fresh mount; its fetched / read shows what the mount fetches "
        "that nobody reads when files come in no order (the target: at most 1.1×).",
        "The FUSE ceiling: `examples/mem_mount` (zonalfs's filesystem, with the daemon's "
        "defaults, over an in-memory client) loaded with the same directories and read by the "
        "same 8 readers twice on one mount; the mount's second epoch is compared with its "
        "second epoch (the target: at least 0.8×).",
        "In the shaped profile one more 1-reader run mounts with `--prefetch-files 0`, so the "
        "effect of prefetch across files shows in the same run.",
        "Mount and peer runs alternate; every read is checked to return every file and byte of "
        "the set.",
    ]
    if shaped:
        text.append(f"The shaped profile reads only the first {shaped['dirs']} "
                    f"director{'y' if shaped['dirs'] == 1 else 'ies'} ({shaped['files']} objects, "
                    f"{shaped['bytes'] / 1e6:.0f} MB), to stay bounded.")
    return [" ".join(text), ""]


SEQ_ROWS = [
    ("raw", "raw client: `zonalfs cat` > /dev/null"),
    ("dd", "mount: `dd bs=1M`"),
    ("fio_seq", "mount: fio seq bs=256k"),
    ("four_files", "mount: 4 readers on 4 files (total)"),
    ("quarters", "mount: 4 threads on quarters of one file (total)"),
    ("skip", "mount: skip pattern (read 64 MiB, skip 16 MiB; delivered)"),
    ("peer", "peer: Python AsyncMultiRangeDownloader, 4 ranges in flight"),
]


def profile_report(name: str, r: dict, res: dict, pool_streams: int) -> list[str]:
    flags = " ".join(r["flags"]) or "none"
    lines = [
        f"### Profile: {name} (emulator flags: `{flags}`)",
        "",
        f"Emulator round trip (p50 of 4 KiB range reads through the pool): {r['rtt_us']:.0f} µs.",
        "",
    ]
    seq = {k: (r[k]["mbps"] if k == "skip" else r[k]) for k, _ in SEQ_ROWS if k in r}
    if seq:
        lines += ["| measurement | median | max/min | runs |", "|---|---:|---:|---|"]
        lines += [f"| {label} | {median(seq[k]):.0f} | {spread(seq[k]):.2f} | {fmt(seq[k])} |"
                  for k, label in SEQ_ROWS if k in seq]
        lines.append("")
    if "rand" in r:
        lines += [
            "| random reads (fio QD1, psync) | MB/s | IOPS | p50 µs | p99 µs | fetched / read by fio | fetched / returned by daemon |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for k, v in r["rand"].items():
            lines.append(f"| {k} | {v['mbps']:.1f} | {v['iops']:.0f} | {v['p50_us']:.0f} | "
                         f"{v['p99_us']:.0f} | {v['fetched_ratio']:.3f} | {v['fetched_per_daemon_byte']:.3f} |")
        lines.append("")
    notes = []
    if "open_us" in r:
        notes.append(f"- First byte after open (16 cold 4 MiB files, one at a time, p50): open "
                     f"{r['open_us']:.0f} µs, first 4 KiB read {r['first_byte_us']:.0f} µs, "
                     f"both {r.get('open_first_us', 0):.0f} µs.")
    if "ls_cold_s" in r:
        notes.append(f"- `ls -lR` over {r['ls_objects']} objects: {r['ls_cold_s']:.2f} s cold, "
                     f"{r['ls_warm_s']:.2f} s again on the same mount.")
    if "skip" in r:
        notes.append(f"- Skip pattern fetched {r['skip']['fetched_ratio']:.3f}× the bytes it read.")
    if rss := r.get("rss16"):
        notes.append(f"- 16 concurrent readers with `--memory-limit {rss['limit_mib']}MiB`: peak RSS "
                     f"{rss['hwm_mib']:.0f} MiB (budget peak {rss['budget_peak_mib']:.0f} MiB), "
                     f"{rss['mbps']:.0f} MB/s total.")
    if notes:
        lines += [*notes, ""]
    if "small" in r:
        lines += small_files_table(r["small"])
    if w := r.get("writes"):
        lines += [
            f"| writes ({res['seq_size'] // MiB} MiB) | median | max/min | runs |",
            "|---|---:|---:|---|",
            *[f"| {label} | {median(w[k]):.0f} | {spread(w[k]):.2f} | {fmt(w[k])} |"
              for k, label in WRITE_ROWS],
            "",
            f"- `zonalfs cp` CPU: {median(w['cp_cpu']):.2f} s per GiB (runs "
            + ", ".join(f"{x:.2f}" for x in w["cp_cpu"]) + ")"
            + (f"; the mount daemon's during `dd`: {median(w['dd_cpu']):.2f} s per GiB (runs "
               + ", ".join(f"{x:.2f}" for x in w["dd_cpu"]) + ")" if w.get("dd_cpu") else "")
            + ".",
            "",
        ]
        if "small" in w:
            lines += small_writes_table(w["small"])
        if rss := w.get("rss16w"):
            lines += [f"- 16 concurrent `dd bs=1M conv=fsync` writers of {rss['size_mib']:.0f} MiB "
                      f"each (new files) with `--memory-limit {rss['limit_mib']}MiB`: peak RSS "
                      f"{rss['hwm_mib']:.0f} MiB (VmHWM; budget peak {rss['budget_peak_mib']:.0f} "
                      f"MiB), {rss['mbps']:.0f} MB/s total, one run.", ""]
    ratios = (sequential_ratios(name, r, res, pool_streams) + other_ratios(r)
              + small_files_ratios(name, r.get("small")) + write_ratios(r.get("writes")))
    if ratios:
        lines += ["| ratio | value | target | |", "|---|---:|---:|---|", *ratios, ""]
    return lines


def sequential_ratios(name: str, r: dict, res: dict, pool_streams: int) -> list[str]:
    if "dd" not in r:
        return []
    raw, dd, peer = median(r["raw"]), median(r["dd"]), median(r["peer"])
    four, quarters = median(r["four_files"]), median(r["quarters"])
    rows = [ratio_row("mount `dd` / raw client", dd / raw, "≥ 0.9", dd / raw >= 0.9)]
    if r.get("dd_cpu") and r.get("raw_cpu"):
        cpu = median(r["dd_cpu"]) / median(r["raw_cpu"])
        rows.append(ratio_row(f"daemon CPU per GiB (`dd`, {median(r['dd_cpu']):.2f} s) / raw client's "
                              f"({median(r['raw_cpu']):.2f} s)", cpu, "≤ 1.1", cpu <= 1.1))
    if c := res.get("ceilings"):
        rows.append(ratio_row("mount `dd` / FUSE ceiling (in-memory client)", dd / median(c["fuse_mem"])))
    rows.append(ratio_row("mount `dd` / peer", dd / peer, "≥ 3", dd / peer >= 3))
    unshaped_raw = res["profiles"].get("unshaped", {}).get("raw")
    if name == "shaped" and unshaped_raw:
        ceiling = min(pool_streams * SHAPED_STREAM_MBPS, median(unshaped_raw))
        rows.append(ratio_row(f"one reader / min({pool_streams} streams × {SHAPED_STREAM_MBPS} MB/s, "
                              f"unshaped raw) = {ceiling:.0f}", dd / ceiling, "≥ 0.80",
                              dd / ceiling >= 0.80))
    rows += [
        ratio_row("4 readers on 4 files: max/min across runs", spread(r["four_files"]), "≤ 1.25",
                  spread(r["four_files"]) <= 1.25),
        ratio_row("4 threads on quarters: max/min across runs", spread(r["quarters"]), "≤ 1.25",
                  spread(r["quarters"]) <= 1.25),
        ratio_row("4 readers on 4 files / one reader (`dd`)", four / dd, "≥ 1.0", four / dd >= 1.0),
        ratio_row("4 threads on quarters / one reader (`dd`)", quarters / dd, "≥ 0.9",
                  quarters / dd >= 0.9),
    ]
    return rows


def other_ratios(r: dict) -> list[str]:
    rows = []
    if "rand" in r:
        r4 = r["rand"]["4k page cache"]
        rows += [
            ratio_row("random 4 KiB fetched / delivered", r4["fetched_ratio"], "≤ 1.25",
                      r4["fetched_ratio"] <= 1.25, ".3f"),
            ratio_row("random 4 KiB p50 / emulator round trip", r4["p50_us"] / r["rtt_us"], "≤ 1.5",
                      r4["p50_us"] <= 1.5 * r["rtt_us"]),
        ]
    if "open_first_us" in r:
        both = r["open_first_us"]
        if r.get("latency_ms"):
            lat = r["latency_ms"] * 1000
            rows.append(ratio_row("open + first 4 KiB of a cold file (p50) / latency", both / lat,
                                  "≤ 1.5", both <= 1.5 * lat))
        else:
            rows.append(ratio_row("open + first 4 KiB of a cold file (p50) / emulator round trip",
                                  both / r["rtt_us"], "≤ 4", both <= 4 * r["rtt_us"]))
    if rss := r.get("rss16"):
        over = rss["hwm_mib"] - rss["limit_mib"]
        rows.append(ratio_row("peak RSS − memory limit (16 readers), MiB", over, "≤ 64", over <= 64, ".0f"))
    return rows


WRITE_ROWS = [
    ("dd", "mount: `dd bs=1M conv=fsync` into a new file"),
    ("cp", "`zonalfs cp` (appendable upload, finalized)"),
    ("cat_back", "`zonalfs cat` of it back"),
    ("peer", "peer: official Python writer (`AsyncAppendableObjectWriter`)"),
]


def write_ratios(w: dict | None) -> list[str]:
    if not w:
        return []
    cp, back, peer = median(w["cp"]), median(w["cat_back"]), median(w["peer"])
    rows = []
    if w.get("dd"):
        dd = median(w["dd"])
        rows.append(ratio_row("mount `dd conv=fsync` / `zonalfs cp`", dd / cp, "≥ 0.85", dd / cp >= 0.85))
    rows += [ratio_row("`zonalfs cp` / `zonalfs cat` back", cp / back),
             ratio_row("`zonalfs cp` / Python writer", cp / peer)]
    if s := w.get("small"):
        for n, what in ((1, "1 writer / peer 1 in flight"), (8, "8 writers / peer 8 in flight")):
            ratio = small_median(s, f"mount{n}", "files_s") / small_median(s, f"peer{n}", "files_s")
            rows.append(ratio_row(f"small files/s written: mount {what}", ratio, "—"))
    if rss := w.get("rss16w"):
        hwm, limit = rss["hwm_mib"], rss["limit_mib"]
        rows.append(ratio_row(f"peak RSS with 16 writers, `--memory-limit {limit}MiB`, MiB", hwm,
                              f"≤ {limit + 64} (limit + 64)", hwm <= limit + 64, ".0f"))
    return rows


SMALL_WRITE_ROWS = [
    ("mount1", "mount, 1 writer (fresh mount)"),
    ("mount8", "mount, 8 writers (fresh mount)"),
    ("peer1", "peer: 1 object in flight"),
    ("peer8", "peer: 8 objects in flight"),
]


def small_writes_table(s: dict) -> list[str]:
    """The small files written: files/s, MB/s, the daemon's CPU per file."""
    lines = [
        f"| small files written ({s['files']} files of 4–256 KiB, {s['bytes'] / 1e6:.0f} MB, "
        f"{s['dirs']} directories) | files/s | MB/s | daemon CPU µs/file | max/min | "
        "files/s, runs |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for key, label in SMALL_WRITE_ROWS:
        runs = s[key]
        cpu = f"{small_median(s, key, 'cpu_us'):.0f}" if "cpu_us" in runs[0] else "–"
        files_s = [x["files_s"] for x in runs]
        lines.append(f"| {label} | {median(files_s):.0f} | {small_median(s, key, 'mbps'):.0f} | "
                     f"{cpu} | {spread(files_s):.2f} | {fmt(files_s)} |")
    lines += [
        "",
        f"Small files written: a local tree ({s['files']} files, sizes log-uniform from a fixed "
        "seed) copied in. The mount's writer, `scripts/bench/small_write.py`, creates the "
        "directories, then forks 1 or 8 processes; writer k takes files k, k+8, … of the "
        "sorted listing and for each reads the local file, opens a new file in the mount, "
        "writes it whole and closes it (the daemon persists at the close; the object stays "
        "appendable, the mount's default). The peer, `scripts/bench/peer_small_write.py`, "
        "writes each file as one `AsyncAppendableObjectWriter` object (open, one append, "
        "`close(finalize_on_close=True)`), 1 or 8 in flight. Each run writes under a new "
        "directory; the emulator's tree is checked to hold every file with the tree's bytes, "
        "then the copy is removed. Runs alternate.",
        "",
    ]
    return lines


SMALL_ROWS = [
    ("mount1", "mount, 1 reader (cold mount)"),
    ("mount1_nopf", "mount, 1 reader, `--prefetch-files 0` (cold mount)"),
    ("mount8", "mount, 8 readers (cold mount)"),
    ("mount8_warm", "mount, 8 readers, second epoch (same mount)"),
    ("mount1_random", "mount, 1 reader, random file order (cold mount)"),
    ("peer1", "peer: 1 object in flight"),
    ("peer8", "peer: 8 objects in flight"),
    ("mem8", "FUSE ceiling (`mem_mount`), 8 readers (cold mount)"),
    ("mem8_warm", "FUSE ceiling (`mem_mount`), 8 readers, second epoch (same mount)"),
]
# The plot's bars: the mount against its peer.
SMALL_PLOT = [
    ("mount1", "mount\n1 reader"), ("mount8", "mount\n8 readers"),
    ("mount8_warm", "mount 8,\n2nd epoch"), ("peer1", "peer\n1 in flight"),
    ("peer8", "peer\n8 in flight"),
]
# Prefetch across files reported under the table: (key, what the run was).
SMALL_PREFETCH = [
    ("mount1", "1 reader"),
    ("mount8", "8 readers"),
    ("mount1_random", "1 reader in random order"),
]


def small_median(s: dict, key: str, field: str) -> float:
    return median([x[field] for x in s[key]])


def small_files_table(s: dict) -> list[str]:
    lines = [
        f"| small files ({s['files']} objects, {s['bytes'] / 1e6:.0f} MB) | files/s | MB/s | "
        "daemon CPU µs/file | fetched / read | of which listing, s | files/s, runs |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for key, label in SMALL_ROWS:
        if key not in s:
            continue
        runs = s[key]

        def col(field: str, spec: str) -> str:
            return f"{small_median(s, key, field):{spec}}" if field in runs[0] else "–"

        lines.append(f"| {label} | {small_median(s, key, 'files_s'):.0f} | "
                     f"{small_median(s, key, 'mbps'):.0f} | {col('cpu_us', '.0f')} | "
                     f"{col('fetched_ratio', '.3f')} | {col('list_s', '.2f')} | "
                     f"{fmt(x['files_s'] for x in runs)} |")
    lines.append("")
    pf = [f"{what}: {small_median(s, key, 'pf_ahead'):.0f} fetched ahead, "
          f"{small_median(s, key, 'pf_used'):.0f} used, {small_median(s, key, 'pf_wasted'):.0f} wasted"
          f", {small_median(s, key, 'open_pf'):.0f} open prefetches"
          for key, what in SMALL_PREFETCH if key in s and "pf_ahead" in s[key][0]]
    if pf:
        lines += [f"Prefetch across files (`--prefetch-files 16`, the default), cold mount, files "
                  f"of the {s['files']} (medians of the runs' `zonalfs_prefetch_files_total`, "
                  f"`_used_total`, `_wasted_total` and `zonalfs_open_prefetches_total`, read "
                  f"from the metrics endpoint before and after the read; the last counts every "
                  f"open of a small file not yet read, whether or not it was fetched ahead): "
                  + "; ".join(pf) + ".", ""]
    return lines


def small_files_ratios(name: str, s: dict | None) -> list[str]:
    if not s:
        return []
    one = small_median(s, "mount1", "files_s") / small_median(s, "peer1", "files_s")
    eight = small_median(s, "mount8", "files_s") / small_median(s, "peer8", "files_s")
    cpu = small_median(s, "mount8", "cpu_us")
    want_one = 5 if name == "shaped" else 2
    rows = [
        ratio_row("small files/s: mount 1 reader / peer 1 in flight", one, f"≥ {want_one}",
                  one >= want_one),
        ratio_row("small files/s: mount 8 readers / peer 8 in flight", eight, "≥ 3", eight >= 3),
        ratio_row("daemon CPU per small file, 8 readers, µs", cpu, "≤ 150", cpu <= 150, ".0f"),
    ]
    if "mount1_random" in s:
        rnd = small_median(s, "mount1_random", "fetched_ratio")
        rows.append(ratio_row("small files, random file order: fetched / read", rnd, "≤ 1.1",
                              rnd <= 1.1, ".3f"))
    if "mem8_warm" in s:
        warm = small_median(s, "mount8_warm", "files_s") / small_median(s, "mem8_warm", "files_s")
        rows.append(ratio_row("small files/s, 8 readers: second epoch / `mem_mount` second epoch",
                              warm, "≥ 0.8", warm >= 0.8))
    if "mount1_nopf" in s:
        pf = small_median(s, "mount1", "files_s") / small_median(s, "mount1_nopf", "files_s")
        rows.append(ratio_row("small files/s, 1 reader: with / without prefetch across files", pf))
    return rows


def plots(res: dict, img: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img.mkdir(parents=True, exist_ok=True)
    c = res["ceilings"]
    for name, r in res["profiles"].items():
        labels = ["tmpfs", "FUSE over\nmemory", "raw client\n(cat)", "mount\ndd 1M", "mount\nfio 256k",
                  "mount 4\nfiles", "mount 4\nquarters", "mount\nskip", "peer\n(Python)"]
        vals = [median(c["tmpfs"]), median(c["fuse_mem"]), median(r["raw"]), median(r["dd"]),
                median(r["fio_seq"]), median(r["four_files"]), median(r["quarters"]),
                median(r["skip"]["mbps"]), median(r["peer"])]
        colors = ["#999999", "#999999", "#4c72b0"] + ["#55a868"] * 5 + ["#c44e52"]
        fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(17, 4.5),
                                         gridspec_kw={"width_ratios": [3, 2, 2]})
        a1.bar(range(len(vals)), vals, color=colors)
        a1.set_xticks(range(len(vals)), labels, fontsize=8)
        a1.set_ylabel("MB/s (median)")
        a1.set_title(f"Sequential throughput, {name} emulator")
        for i, v in enumerate(vals):
            a1.text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
        keys = list(r["rand"].keys())
        p50 = [r["rand"][k]["p50_us"] for k in keys]
        a2.bar(range(len(keys)), p50, color="#8172b2")
        a2.axhline(r["rtt_us"], color="k", linestyle="--", linewidth=1, label="emulator round trip")
        a2.set_xticks(range(len(keys)), [k.replace(" ", "\n", 1) for k in keys], fontsize=8)
        a2.set_ylabel("p50 latency, µs")
        a2.set_title("Random reads (fio QD1)")
        a2.legend(fontsize=8)
        s = r["small"]
        files_s = [small_median(s, k, "files_s") for k, _ in SMALL_PLOT]
        a3.bar(range(len(files_s)), files_s, color=["#55a868"] * 3 + ["#c44e52"] * 2)
        a3.set_xticks(range(len(files_s)), [label for _, label in SMALL_PLOT], fontsize=8)
        a3.set_ylabel("files/s (median)")
        a3.set_title(f"Small files ({s['files']} of 4-256 KiB)")
        for i, v in enumerate(files_s):
            a3.text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
        fig.tight_layout()
        fig.savefig(img / f"bench-{name}.png", dpi=90)
        plt.close(fig)


def sections_arg(value: str) -> list[str]:
    """--only's list, in the suite's order."""
    want = set(value.split(","))
    if unknown := want - set(SECTIONS):
        raise argparse.ArgumentTypeError(f"unknown section(s) {', '.join(sorted(unknown))}; "
                                         f"choose from {', '.join(SECTIONS)}")
    return [s for s in SECTIONS if s in want]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--bin", required=True)
    p.add_argument("--mem-mount", required=True)
    p.add_argument("--engine-bench", required=True)
    p.add_argument("--python", required=True, help="python with google-cloud-storage")
    p.add_argument("--work", required=True)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--memory-limit-mib", type=int, default=512)
    p.add_argument("--write-memory-limit-mib", type=int, default=256,
                   help="--memory-limit of the mount the 16 writers write into")
    p.add_argument("--pool-streams", type=int, default=4)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--doc", default="docs/benchmarks.md")
    p.add_argument("--img", default="docs/img")
    p.add_argument("--machine", default="")
    p.add_argument("--only", type=sections_arg, metavar="SECTION[,SECTION...]",
                   help=f"run only these sections of {', '.join(SECTIONS)}; the report is "
                        "printed, docs and plots are left alone")
    a = p.parse_args()
    # A timeout's SIGTERM unwinds like Ctrl-C: every mount and the emulator
    # are stopped by their finally blocks.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    res = Suite(a).run()
    Path(a.work, "results.json").write_text(json.dumps(res, indent=1))
    text = report(res, a.machine, a.pool_streams)
    print(text)
    if a.only:
        log(f"partial run: {a.doc} and the plots are left alone")
        return 0
    plots(res, Path(a.img))
    doc = Path(a.doc)
    block = f"<!-- suite:begin (written by scripts/bench.sh) -->\n{text}\n<!-- suite:end -->"
    old = doc.read_text() if doc.exists() else ""
    if "<!-- suite:begin" in old:
        new = re.sub(r"<!-- suite:begin.*?<!-- suite:end -->", lambda _: block, old, flags=re.S)
    else:
        head = "# zonalfs benchmarks\n\nEvery figure here comes from a script in `scripts/`; no test asserts a timing.\n\n"
        new = (old or head) + ("\n" if old else "") + block + "\n"
    doc.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
