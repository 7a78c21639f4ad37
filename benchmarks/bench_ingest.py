"""Ingest benchmark of vmafx-sidecar against the pinned floor: both real servers, driven the way the Go node
drives them, alternately in one run.

Each client sends one request line `{"job_id", "features" (80 floats), "true_score"}` and
blocks until it has read that line's ACK, then sends the next. The floor is
../shared/bench/floor_server.py (a selectors server that only parses, stores and ACKs): parsing costs both
servers the same, so the ratios isolate the sidecar's own per-message work, and running them alternately,
round after round, cancels this machine's drift. Each round runs, per client count, a fresh floor and a
fresh sidecar (training on, every setting at its default: one checkpoint is due after the first 1 000
samples, the next ten minutes later), the order swapped every round; the script prints every round's
figures and ratios against the targets, then the sidecar's own figures, with the machine it ran on:

    .venv/bin/python benchmarks/bench_ingest.py [--rounds 3] [--messages 20000] [--clients 1,4]

Features are sent as Go writes a []float32 (shortest form, ~9 digits); `--float64-features` sends 17-digit
floats, the parser's worst case.

Standard library and numpy only; the server runs as `python -m vmafx_sidecar serve`
with PYTHONPATH at the repository root, so nothing needs to be installed.
`--baseline TREE` adds a third server to every round: the sidecar of another checkout (a worktree of an
earlier commit), so that a change is measured against what it changed, side by side, with the floor.
`--setting NAME=VALUE` (repeatable) runs the sidecar under test, not the baseline, with that setting:
`--baseline . --setting VMAFX_SIDECAR_BATCH_SIZE=128` measures another batch size against the defaults.
`--profile DIR` runs each server under cProfile, writes DIR/server-<n>c.prof and prints
the top functions by tottime (the profiler slows the server: its figures are not the
ones to report).

`--feedback-rate 1000,4000,8000 [--feedback-seconds 10]` measures vmafx_feedback.FeedbackClient
instead: per rate, a fresh server and one client in this process; send() is called at that
fixed offered rate (paced, never waiting on delivery) for the given seconds, then close()
gets 5 s to deliver the rest, and the table shows what was delivered, dropped and rejected.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import vmafx_feedback  # noqa: E402
import vmafx_sidecar as vs  # noqa: E402  before numpy: it pins BLAS to one thread, as in the server

import numpy as np  # noqa: E402
N_FEATURES = 80
FLOOR = ROOT.parent / "shared" / "bench" / "floor_server.py"
DEFAULTS = vs.Config.load({}, {})  # the settings a sidecar runs with when none is set
# What the ratios to the floor must be, and the sidecar's ACK p99 (issue 19).
RATE_RATIO_MIN, CPU_RATIO_MAX, P99_MAX_US = 0.75, 1.5, 1000
CHECKPOINT_LINE = re.compile(r"checkpoint v(\d+) (?:published|quarantined): .*\(step (\d+), (\d+) samples trained, "
                             r"gate [\w-]+, ([\d.]+) ms with the gate\)")
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---- the machine ----

def server_env(socket_path: str, checkpoint_dir: Path, **settings: str) -> dict[str, str]:
    """This environment without VMAFX_* settings, plus a fresh model, a checkpoint as soon as the samples
    allow it, info logs and `settings`: what the benchmark scripts run a server with."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMAFX_")}
    return {**env, "PYTHONPATH": str(ROOT), "VMAFX_SIDECAR_SOCKET": socket_path,
            "VMAFX_SIDECAR_CHECKPOINT_DIR": str(checkpoint_dir), "VMAFX_BASE_MODEL_PATH": "",
            "VMAFX_SIDECAR_CKPT_INTERVAL_S": "0", "VMAFX_SIDECAR_LOG_LEVEL": "info", **settings}


def markdown_table(header: list[str], rows: list[list[str]]) -> None:
    """A Markdown table with aligned columns."""
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), "
            f"Python {platform.python_version()}, numpy {np.__version__}, {platform.system()} {platform.release()}")


# ---- /proc readings of the server ----

def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """utime + stime of a process (all its threads), or of its thread `tid`, in seconds."""
    text = Path(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)


def machine_busy_seconds() -> float:
    """CPU seconds that all processes on the machine have used (busy time of /proc/stat, steal included)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def request(path: str, message: dict, timeout: float) -> dict:
    """One request on a fresh connection, and its ACK."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(message).encode() + b"\n")
        with s.makefile("rb") as reader:
            line = reader.readline()
    if not line.endswith(b"\n"):
        raise OSError(f"partial answer {line!r}")
    return json.loads(line)


def status_kb(pid: int, key: str) -> int | None:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


# ---- the server ----

class Server:
    def __init__(self, workdir: Path, profile_out: Path | None, floor: Path | None = None, tree: Path = ROOT,
                 settings: dict[str, str] | None = None):
        """The sidecar of `tree` (a checkout) at its default settings but `settings`, or with `floor` that floor
        server."""
        self.workdir = workdir
        self.sockdir = tempfile.mkdtemp(prefix="vxb")  # AF_UNIX paths are limited to ~107 bytes
        self.socket = os.path.join(self.sockdir, "s.sock")
        self.checkpoint_dir = workdir / "ckpt"
        self.stderr_path = workdir / "server.log"
        self.profile_out = profile_out
        self.floor = floor
        self.env = {**server_env(self.socket, self.checkpoint_dir,
                                 VMAFX_SIDECAR_CKPT_INTERVAL_S=str(DEFAULTS.ckpt_interval_s), **(settings or {})),
                    "PYTHONPATH": str(tree)}
        self.proc: subprocess.Popen | None = None
        self.ready_s: float | None = None

    def start(self, timeout: float = 30.0) -> None:
        """Start the server and wait until it answers (the sidecar a ping, the floor a connection); ready_s is
        how long that took."""
        profile = ("-m", "cProfile", "-o", str(self.profile_out)) if self.profile_out else ()
        self.stderr_file = open(self.stderr_path, "wb")
        started = time.perf_counter()
        try:
            if self.floor:
                self.proc = start_floor(self.floor, self.env, timeout, self.stderr_file, self.workdir, profile)
            else:
                self.proc = vs.start_server(self.env, timeout, stderr=self.stderr_file, cwd=self.workdir,
                                            python_args=profile)
        except vs.ServerNotReady as e:
            raise RuntimeError(f"{e}:\n{self.log()}") from None
        self.ready_s = time.perf_counter() - started

    def request(self, message: dict, timeout: float = 5.0) -> dict:
        return request(self.socket, message, timeout)

    def log(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr_file.close()
        return self.proc.returncode

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.sockdir, ignore_errors=True)


def start_floor(path: Path, env: dict[str, str], timeout_s: float, stderr, cwd: Path,
                python_args: tuple[str, ...]) -> subprocess.Popen:
    """The floor server, once its socket accepts a connection (it answers no ping)."""
    proc = subprocess.Popen([sys.executable, *python_args, str(path)], env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=stderr)
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(env["VMAFX_SIDECAR_SOCKET"])
            return proc
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise vs.ServerNotReady(f"the floor server did not listen within {timeout_s:g} s") from None
            time.sleep(0.02)
    raise vs.ServerNotReady(f"the floor server exited with {proc.returncode}")


# ---- the clients ----

def make_lines(n: int, client: int, seed: int, float32: bool) -> list[bytes]:
    """Request lines with float64 features at full precision (17 digits, the parser's worst case),
    or with float32 features in shortest form (~9 digits), as Go writes a []float32."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (n, N_FEATURES))
    y = rng.uniform(20, 100, n)
    if float32:
        features = ["[" + ", ".join(map(str, row)) + "]" for row in x.astype(np.float32)]
    else:
        features = [json.dumps(row.tolist()) for row in x]
    return [f'{{"job_id": "job-{client}-{i:06d}", "features": {features[i]}, "true_score": {float(y[i])!r}}}\n'.encode()
            for i in range(n)]


def client_main(path: str, client: int, lines: list[bytes], barrier, results, names_jobs: bool) -> None:
    """One node connection: send a line, wait for its ACK, repeat. Runs in its own process. `names_jobs`: the
    server's ACKs carry the request's job_id (the sidecar's do, the floor's not)."""
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(60)
        sock.connect(path)
        reader = sock.makefile("rb")
        latencies = np.zeros(len(lines), np.int64)
        acks: list[bytes] = [b""] * len(lines)
        send, readline, clock = sock.sendall, reader.readline, time.perf_counter_ns
        barrier.wait(timeout=60)
        usage0 = resource.getrusage(resource.RUSAGE_SELF)
        start = clock()
        for i, line in enumerate(lines):
            t0 = clock()
            send(line)
            ack = readline()
            latencies[i] = clock() - t0
            acks[i] = ack
        end = clock()
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
        reader.close()
        sock.close()
        cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
        # Checked after the clock stops, so that parsing ACKs costs the server no CPU.
        errors, first_error, checkpoints = 0, None, 0
        for i, raw in enumerate(acks):
            expected = f"job-{client}-{i:06d}"
            try:
                ack = json.loads(raw)
                good = ack.get("ok") is True and (not names_jobs or ack.get("job_id") == expected)
            except ValueError:
                ack, good = raw, False
            if not good:
                errors += 1
                first_error = first_error or f"message {i} ({expected}): ACK {ack!r}"
                continue
            checkpoints += bool(ack.get("checkpoint"))
        results.put(dict(client=client, start=start, end=end, latencies=latencies.tobytes(), cpu=cpu,
                         errors=errors, first_error=first_error, checkpoints=checkpoints))
    except BaseException as e:  # report, so that the parent does not wait forever
        results.put(dict(client=client, crashed=f"{type(e).__name__}: {e}"))
        raise


# ---- one configuration ----

@dataclass
class Run:
    server: str  # "sidecar" or "floor"
    clients: int
    messages: int = 0
    wall_s: float = 0.0
    latencies_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    machine_cpu_s: float = 0.0
    checkpoint_acks: int = 0
    errors: int = 0
    first_error: str | None = None
    checkpoint_ms: list[float] = field(default_factory=list)
    checkpoint_files: int = 0
    peak_rss_kb: int | None = None
    ready_s: float | None = None
    server_status: dict | None = None
    exit_code: int | None = None

    @property
    def rate(self) -> float:
        return self.messages / self.wall_s if self.wall_s else 0.0

    def latency_us(self, q: float) -> float:
        return float(np.percentile(self.latencies_ns, q)) / 1e3 if len(self.latencies_ns) else float("nan")


@dataclass
class Contender:
    """One of a round's servers: the floor, the sidecar under test (with its settings), or the baseline's."""
    kind: str  # "floor", "sidecar" or "baseline"
    tree: Path = ROOT
    floor: Path | None = None
    settings: dict[str, str] = field(default_factory=dict)


def run_config(n_clients: int, lines_per_client: list[list[bytes]], profile_dir: Path | None,
               contender: Contender) -> Run:
    """One fresh server and n_clients clients."""
    kind, floor = contender.kind, contender.floor
    run = Run(kind, n_clients, messages=sum(map(len, lines_per_client)))
    with tempfile.TemporaryDirectory(prefix="vmafx-bench-") as tmp:
        profile_out = profile_dir / f"{kind}-{n_clients}c.prof" if profile_dir else None
        server = Server(Path(tmp), profile_out, floor, contender.tree, contender.settings)
        try:
            server.start()
            run.ready_s = server.ready_s
            ctx = mp.get_context("fork")  # the pre-encoded lines reach the children without pickling
            barrier = ctx.Barrier(n_clients + 1)
            results = ctx.Queue()
            procs = [ctx.Process(target=client_main, args=(server.socket, c, lines, barrier, results, not floor))
                     for c, lines in enumerate(lines_per_client)]
            for p in procs:
                p.start()
            cpu0, busy0 = cpu_seconds(server.proc.pid), machine_busy_seconds()
            barrier.wait(timeout=60)
            reports = [results.get(timeout=600) for _ in procs]
            cpu1, busy1 = cpu_seconds(server.proc.pid), machine_busy_seconds()
            for p in procs:
                p.join(timeout=60)
            crashed = [r["crashed"] for r in reports if "crashed" in r]
            if crashed:
                raise RuntimeError("client failed: " + "; ".join(crashed))
            run.server_cpu_s = cpu1 - cpu0
            run.machine_cpu_s = busy1 - busy0
            run.wall_s = (max(r["end"] for r in reports) - min(r["start"] for r in reports)) / 1e9
            run.latencies_ns = np.concatenate([np.frombuffer(r["latencies"], np.int64) for r in reports])
            run.client_cpu_s = sum(r["cpu"] for r in reports)
            run.errors = sum(r["errors"] for r in reports)
            run.first_error = next((r["first_error"] for r in reports if r["first_error"]), None)
            run.checkpoint_acks = sum(r["checkpoints"] for r in reports)
            if not floor:
                try:
                    run.server_status = server.request({"op": "status"})
                except (OSError, ValueError):
                    run.server_status = None
            run.peak_rss_kb = status_kb(server.proc.pid, "VmHWM")
            run.exit_code = server.stop()
            log = server.log()
            if not floor:
                run.checkpoint_ms = [float(m.group(4)) for m in CHECKPOINT_LINE.finditer(log)]
                run.checkpoint_files = sum(1 for d in (server.checkpoint_dir, server.checkpoint_dir / "quarantine")
                                           for n in os.listdir(d) if re.fullmatch(r"model_v\d{6,}\.onnx", n))
            if run.exit_code != 0:
                print(f"warning: {kind} ({n_clients} clients) exited with {run.exit_code}; log tail:\n"
                      + "\n".join(log.splitlines()[-20:]), file=sys.stderr)
        finally:
            server.cleanup()
    return run


# ---- FeedbackClient at a fixed offered rate ----

FEEDBACK_CLOSE_TIMEOUT_S = 5.0


@dataclass
class FeedbackRun:
    rate: int
    offered: int = 0
    send_s: float = 0.0  # first send to last send
    total_s: float = 0.0  # first send to close() returning
    delivered: int = 0
    dropped: int = 0
    rejected: int = 0
    resent: int = 0
    send_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    client_cpu_s: float = 0.0  # this process: the paced sender and the delivery thread
    thread_cpu_s: float = 0.0  # the delivery thread alone
    server_cpu_s: float = 0.0
    machine_cpu_s: float = 0.0
    server_accepted: int | None = None


def run_feedback(rate: int, seconds: float, rows: list[list[float]], scores: list[float]) -> FeedbackRun:
    run = FeedbackRun(rate, offered=max(1, round(rate * seconds)))
    with tempfile.TemporaryDirectory(prefix="vmafx-bench-") as tmp:
        server = Server(Path(tmp), None)
        try:
            server.start()
            client = vmafx_feedback.FeedbackClient(server.socket)
            thread = next(t for t in threading.enumerate() if t.name == "vmafx-feedback" and t.is_alive())
            send, clock, period = client.send, time.perf_counter, 1.0 / rate
            send_ns = np.zeros(run.offered, np.int64)
            usage0 = resource.getrusage(resource.RUSAGE_SELF)
            thread0 = cpu_seconds(os.getpid(), thread.native_id)
            cpu0, busy0 = cpu_seconds(server.proc.pid), machine_busy_seconds()
            start = due = clock()
            for i in range(run.offered):
                if (wait := due - clock()) > 0:
                    time.sleep(wait)
                t0 = time.perf_counter_ns()
                send(rows[i % len(rows)], scores[i % len(scores)], f"fb-{i:07d}")
                send_ns[i] = time.perf_counter_ns() - t0
                due += period  # a fixed schedule: when behind it, sends go back to back until caught up
            run.send_s = clock() - start
            thread1 = cpu_seconds(os.getpid(), thread.native_id)  # the thread is gone after close()
            client.close(FEEDBACK_CLOSE_TIMEOUT_S)
            run.total_s = clock() - start
            usage1 = resource.getrusage(resource.RUSAGE_SELF)
            cpu1, busy1 = cpu_seconds(server.proc.pid), machine_busy_seconds()
            run.send_ns = send_ns
            run.delivered, run.dropped, run.rejected, run.resent = (client.delivered, client.dropped,
                                                                    client.rejected, client.resent)
            run.client_cpu_s = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
            run.thread_cpu_s = thread1 - thread0
            run.server_cpu_s, run.machine_cpu_s = cpu1 - cpu0, busy1 - busy0
            run.server_accepted = server.request({"op": "status"})["samples_accepted"]
            if server.stop() != 0:
                print(f"warning: server ({rate} msgs/s) exited with {server.proc.returncode}", file=sys.stderr)
        finally:
            server.cleanup()
    return run


def print_feedback_table(runs: list[FeedbackRun]) -> None:
    header = ["figure"] + [f"{fmt_int(r.rate)} msgs/s" for r in runs]
    figures = [
        ("offered (send() calls)", lambda r: fmt_int(r.offered)),
        ("achieved offered rate", lambda r: f"{fmt_int(r.offered / r.send_s)} /s"),
        ("delivered", lambda r: fmt_int(r.delivered)),
        ("dropped", lambda r: fmt_int(r.dropped)),
        ("rejected", lambda r: fmt_int(r.rejected)),
        ("resent (unknown delivery)", lambda r: fmt_int(r.resent)),
        ("server samples_accepted", lambda r: "n/a" if r.server_accepted is None else fmt_int(r.server_accepted)),
        ("delivered/s (first send to close() done)", lambda r: fmt_int(r.delivered / r.total_s)),
        ("close() drain", lambda r: f"{r.total_s - r.send_s:.2f} s"),
        ("send() p50 / p99 / max", lambda r: " / ".join(f"{np.percentile(r.send_ns, q) / 1e3:.0f}"
                                                        for q in (50, 99, 100)) + " µs"),
        ("client process CPU (of one core)", lambda r: f"{100 * r.client_cpu_s / r.total_s:.0f} %"),
        ("delivery thread CPU (of one core, while sending)", lambda r: f"{100 * r.thread_cpu_s / r.send_s:.0f} %"),
        ("server CPU (of one core)", lambda r: f"{100 * r.server_cpu_s / r.total_s:.0f} %"),
        ("other load on the machine",
         lambda r: f"{max(0.0, r.machine_cpu_s - r.server_cpu_s - r.client_cpu_s) / r.total_s:.2f} cores"),
    ]
    rows = [[name] + [value(r) for r in runs] for name, value in figures]
    markdown_table(header, rows)


def feedback_main(rates: list[int], seconds: float) -> int:
    print(f"machine: {machine()}")
    print(f"FeedbackClient: one client, capacity 1000, {seconds:g} s per rate, close({FEEDBACK_CLOSE_TIMEOUT_S:g}), "
          f"features: {N_FEATURES} float64 from Python lists, GIL switch interval {sys.getswitchinterval() * 1e3:g} ms")
    rng = np.random.default_rng(2000)
    rows, scores = rng.uniform(0, 1, (1000, N_FEATURES)).tolist(), rng.uniform(20, 100, 1000).tolist()
    runs = [run_feedback(rate, seconds, rows, scores) for rate in rates]
    print()
    print_feedback_table(runs)
    return 0


# ---- the training step, measured in-process ----

def steady_trainer(checkpoint_dir: str,
                   settings: dict[str, str] | None = None) -> tuple[vs.Trainer, np.ndarray, np.ndarray]:
    """A Trainer built the way serve() builds it, its replay buffer full as in steady state (no checkpoint falls
    due), and samples to feed it: more rows than a step takes."""
    config = vs.Config.load({**(settings or {}), "VMAFX_SIDECAR_CHECKPOINT_DIR": checkpoint_dir,
                             "VMAFX_BASE_MODEL_PATH": "", "VMAFX_SIDECAR_MIN_SAMPLES_CKPT": str(10**15)}, {})
    trainer, _ = vs.build_trainer(config)
    data, rows = np.random.default_rng(7), max(4096, 2 * trainer.n_new)
    x = data.uniform(0, 1, (rows, config.n_features)).astype(np.float32)
    y = data.uniform(20, 100, rows).astype(np.float32)
    for i in range(0, config.replay_capacity, len(x)):
        n = min(len(x), config.replay_capacity - i)
        trainer.replay.extend(x[:n], y[:n])
    return trainer, x, y


def pend_step(trainer: vs.Trainer, x: np.ndarray, y: np.ndarray, i: int) -> None:
    """Leave the i-th step's new samples pending, as add() does before it runs the step."""
    n_new = trainer.n_new
    j = (i * n_new) % (len(x) - n_new)
    trainer.pending_x[:] = x[j:j + n_new]
    trainer.pending_y[:] = y[j:j + n_new]


def measure_train_step(steps: int = 5000, warmup: int = 500,
                       settings: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Median and p99 of Trainer.step() in µs, in a tight loop."""
    with tempfile.TemporaryDirectory(prefix="vmafx-bench-step-") as tmp:
        trainer, x, y = steady_trainer(tmp, settings)
        times = np.zeros(steps, np.int64)
        clock = time.perf_counter_ns
        for i in range(warmup + steps):
            pend_step(trainer, x, y, i)
            t0 = clock()
            trainer.step()
            t1 = clock()
            if i >= warmup:
                times[i - warmup] = t1 - t0
        shape = (f"batch {trainer.config.batch_size} ({trainer.n_new} new + {trainer.n_replay} replay), "
                 f"{'-'.join(map(str, trainer.model.sizes))}")
        return float(np.median(times)) / 1e3, float(np.percentile(times, 99)) / 1e3, shape


# ---- the report ----

def fmt_int(v: float) -> str:
    return f"{v:,.0f}".replace(",", " ")


def cell(text: str, ok: bool | None) -> str:
    return text + (" ✗" if ok is False else "")


def cpu_per_1000(r: Run) -> float:
    return r.server_cpu_s / r.messages * 1000


def other_load(r: Run) -> float:
    """Cores that something else on the machine used during the run: beyond ~0, the figures are suspect."""
    return max(0.0, r.machine_cpu_s - r.server_cpu_s - r.client_cpu_s) / r.wall_s


def targets_met(floor: Run, sidecar: Run) -> dict[str, bool]:
    return {"throughput": sidecar.rate >= RATE_RATIO_MIN * floor.rate,
            "CPU": cpu_per_1000(sidecar) <= CPU_RATIO_MAX * cpu_per_1000(floor),
            "ACK p99": sidecar.latency_us(99) < P99_MAX_US}


def print_rounds(pairs: list[tuple[int, Run, Run]]) -> None:
    """Every round's figures of both servers, and the sidecar's ratios to the floor, marked ✗ where they miss."""
    header = ["round", "conns", "msgs/s floor", "msgs/s sidecar", f"ratio (≥ {RATE_RATIO_MIN})", "ACK p99 floor",
              "ACK p99 sidecar (< 1 ms)", "CPU s/1000 msgs floor", "sidecar", f"ratio (≤ {CPU_RATIO_MAX})",
              "other load"]
    rows = []
    for round_, floor, sidecar in pairs:
        met = targets_met(floor, sidecar)
        rows.append([str(round_), str(sidecar.clients), fmt_int(floor.rate), fmt_int(sidecar.rate),
                     cell(f"{sidecar.rate / floor.rate:.2f}", met["throughput"]),
                     f"{floor.latency_us(99):.0f} µs", cell(f"{sidecar.latency_us(99):.0f} µs", met["ACK p99"]),
                     f"{cpu_per_1000(floor):.3f}", f"{cpu_per_1000(sidecar):.3f}",
                     cell(f"{cpu_per_1000(sidecar) / cpu_per_1000(floor):.2f}", met["CPU"]),
                     f"{max(other_load(floor), other_load(sidecar)):.2f} cores"])
    markdown_table(header, rows)
    print()
    for n in sorted({s.clients for _, _, s in pairs}):
        mine = [(f, s) for _, f, s in pairs if s.clients == n]
        counts = {k: sum(targets_met(f, s)[k] for f, s in mine) for k in ("throughput", "CPU", "ACK p99")}
        print(f"{n} connection{'s' if n != 1 else ''}: targets met in " + ", ".join(
            f"{k} {c}/{len(mine)}" for k, c in counts.items()) + f" rounds; median throughput ratio "
            f"{statistics.median(s.rate / f.rate for f, s in mine):.2f}, CPU ratio "
            f"{statistics.median(cpu_per_1000(s) / cpu_per_1000(f) for f, s in mine):.2f}")


def print_baseline(triples: list[tuple[int, Run, Run, Run]], tree: Path) -> None:
    """Every round's figures of the baseline's sidecar and this one, each against the floor of its round."""
    print(f"this sidecar against the baseline {tree}, both against the floor of the same round:\n")
    header = ["round", "conns", "msgs/s baseline", "msgs/s sidecar", "ratio", "CPU s/1000 msgs baseline", "sidecar",
              "ratio", "throughput / floor: baseline, sidecar", "CPU / floor: baseline, sidecar"]
    rows = []
    for round_, floor, base, mine in triples:
        rows.append([str(round_), str(mine.clients), fmt_int(base.rate), fmt_int(mine.rate),
                     f"{mine.rate / base.rate:.2f}", f"{cpu_per_1000(base):.3f}", f"{cpu_per_1000(mine):.3f}",
                     f"{cpu_per_1000(mine) / cpu_per_1000(base):.2f}",
                     f"{base.rate / floor.rate:.2f}, {mine.rate / floor.rate:.2f}",
                     f"{cpu_per_1000(base) / cpu_per_1000(floor):.2f}, {cpu_per_1000(mine) / cpu_per_1000(floor):.2f}"])
    markdown_table(header, rows)


def print_sidecar_figures(runs: list[Run], step: tuple[float, float, str]) -> None:
    """What only the sidecar has: its training step, checkpoints, memory and start-up, over every round."""
    by: dict[int, list[Run]] = {}
    for r in runs:
        by.setdefault(r.clients, []).append(r)
    cols = sorted(by)
    header = ["sidecar, over every round"] + [f"{c} connection{'s' if c != 1 else ''}" for c in cols]
    median_us, p99_us, shape = step
    checkpoint_ms = {c: [ms for r in by[c] for ms in r.checkpoint_ms] for c in cols}
    figures = [
        (f"median train step, {shape} (in-process, once)", lambda c: f"{median_us:.1f} µs (p99 {p99_us:.0f})"),
        ("ACK latency p50 / max", lambda c: f"{statistics.median(r.latency_us(50) for r in by[c]):.0f} µs / "
                                            f"{max(r.latency_us(100) for r in by[c]) / 1e3:.1f} ms"),
        ("checkpoint with its gate, median / max", lambda c: f"{statistics.median(checkpoint_ms[c]):.1f} / "
         f"{max(checkpoint_ms[c]):.1f} ms" if checkpoint_ms[c] else "n/a"),
        ("checkpoint ACKs / log lines / files, each run",
         lambda c: ", ".join(f"{r.checkpoint_acks} / {len(r.checkpoint_ms)} / {r.checkpoint_files}" for r in by[c])),
        ("peak RSS (VmHWM), max", lambda c: f"{max(r.peak_rss_kb or 0 for r in by[c]) / 1024:.1f} MB"),
        ("start to socket ready, median", lambda c: f"{statistics.median(r.ready_s for r in by[c]):.3f} s"),
        ("bad ACKs (not ok, wrong job_id or order)", lambda c: str(sum(r.errors for r in by[c]))),
    ]
    markdown_table(header, [[name] + [value(c) for c in cols] for name, value in figures])


def print_profile(path: Path, top: int = 25) -> None:
    import pstats
    print(f"\n### {path.name}: top {top} functions by tottime\n")
    pstats.Stats(str(path)).sort_stats("tottime").print_stats(top)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of floor and sidecar, alternated (default 3)")
    parser.add_argument("--messages", type=int, default=20000, help="messages per run (default 20000)")
    parser.add_argument("--clients", default="1,4", help="comma-separated client counts (default 1,4)")
    parser.add_argument("--steps", type=int, default=5000, help="timed train steps (default 5000)")
    parser.add_argument("--float64-features", action="store_true",
                        help="send features as 17-digit floats instead of float32 shortest form (~9 digits)")
    parser.add_argument("--floor", type=Path, default=FLOOR, help=f"the floor server (default {FLOOR})")
    parser.add_argument("--baseline", metavar="TREE", type=Path,
                        help="also run the sidecar of this checkout (say, a worktree of an earlier commit) in every "
                             "round, and compare the two")
    parser.add_argument("--setting", metavar="NAME=VALUE", action="append", default=[],
                        help="run the sidecar under test (not the baseline) with this setting, say "
                             "VMAFX_SIDECAR_BATCH_SIZE=128; repeatable")
    parser.add_argument("--profile", metavar="DIR", type=Path,
                        help="run each server under cProfile, write DIR/<server>-<n>c.prof (the last round's), print "
                             "the top functions")
    parser.add_argument("--feedback-rate", metavar="MSGS_PER_S[,MSGS_PER_S...]",
                        help="measure FeedbackClient at these offered rates instead (see above)")
    parser.add_argument("--feedback-seconds", type=float, default=10.0,
                        help="seconds of sending per --feedback-rate (default 10)")
    args = parser.parse_args(argv)
    if args.feedback_rate:
        rates = [int(r) for r in args.feedback_rate.split(",") if r.strip()]
        if not rates or min(rates) < 1 or args.feedback_seconds <= 0:
            parser.error("--feedback-rate needs rates >= 1 and --feedback-seconds > 0")
        return feedback_main(rates, args.feedback_seconds)
    counts = [int(c) for c in args.clients.split(",") if c.strip()]
    if args.messages < 1 or args.rounds < 1 or not counts or min(counts) < 1:
        parser.error("--messages, --rounds and each --clients count must be >= 1")
    if not args.floor.is_file():
        parser.error(f"no floor server at {args.floor}")
    if args.baseline and not (args.baseline / "vmafx_sidecar.py").is_file():
        parser.error(f"no vmafx_sidecar.py in --baseline {args.baseline}")
    settings, known = {}, {f.metadata["env"] for f in fields(vs.Config)}
    for setting in args.setting:
        name, equals, value = setting.partition("=")
        if not (name in known and equals):
            parser.error(f"--setting {setting!r}: expected NAME=VALUE, NAME one of the sidecar's settings")
        settings[name] = value
    try:
        vs.Config.load(settings, {})
    except vs.ConfigError as e:
        parser.error(f"--setting: {e}")
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)

    print(f"machine: {machine()}")
    print(f"{args.rounds} rounds of floor ({args.floor}), sidecar"
          + (f" and the baseline's sidecar ({args.baseline})" if args.baseline else "")
          + f" alternated, {args.messages} messages a run, "
          f"clients: {', '.join(map(str, counts))}, features: "
          + ("float64, 17 digits" if args.float64_features else "float32 shortest form")
          + (" (servers under cProfile: figures are slowed by the profiler)" if args.profile else "")
          + "".join(f"\nthe sidecar under test runs with {name}={value}" for name, value in settings.items()))

    step = measure_train_step(args.steps, settings=settings)
    lines = {}
    for n in counts:
        per = [args.messages // n + (c < args.messages % n) for c in range(n)]
        lines[n] = [make_lines(k, c, 1000 + c, not args.float64_features) for c, k in enumerate(per)]  # before the clock
    servers = [Contender("floor", floor=args.floor), Contender("sidecar", settings=settings)]
    if args.baseline:
        servers.append(Contender("baseline", args.baseline.resolve()))
    pairs, sidecars, triples = [], [], []
    for round_ in range(1, args.rounds + 1):
        for n in counts:
            order = servers[round_ % len(servers):] + servers[:round_ % len(servers)]  # who goes first rotates
            runs = {r.server: r for r in (run_config(n, lines[n], args.profile, c) for c in order)}
            pairs.append((round_, runs["floor"], runs["sidecar"]))
            sidecars.append(runs["sidecar"])
            if args.baseline:
                triples.append((round_, runs["floor"], runs["baseline"], runs["sidecar"]))
    print()
    print_rounds(pairs)
    print()
    if args.baseline:
        print_baseline(triples, args.baseline)
        print()
    print_sidecar_figures(sidecars, step)
    for r in [run for _, f, s in pairs for run in (f, s)] + [b for _, _, b, _ in triples]:
        if r.first_error:
            print(f"\n{r.server}, {r.clients} connection(s): first bad ACK: {r.first_error}")
        s = r.server_status
        if s is not None and s.get("samples_accepted") != r.messages:
            print(f"\n{r.clients} connection(s): server status says {s.get('samples_accepted')} samples "
                  f"accepted, expected {r.messages}")
    if args.profile:
        for path in sorted(args.profile.glob("*.prof")):
            print_profile(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
