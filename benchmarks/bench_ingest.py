"""Ingest benchmark of vmafx-sidecar: a real server, driven the way the Go node drives it.

Each client sends one request line `{"job_id", "features" (80 floats), "true_score"}` and
blocks until it has read that line's ACK, then sends the next. The script runs the
server once per client count (a fresh server each time, so start-up is measured and
checkpoints start at v000001), and prints a Markdown table with the machine it ran on:

    .venv/bin/python benchmarks/bench_ingest.py [--messages 20000] [--clients 1,4]

Standard library and numpy only; the server runs as `python -m vmafx_sidecar serve`
with PYTHONPATH at the repository root, so nothing needs to be installed.
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
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import vmafx_feedback  # noqa: E402
import vmafx_sidecar as vs  # noqa: E402  before numpy: it pins BLAS to one thread, as in the server

import numpy as np  # noqa: E402
N_FEATURES = 80
CKPT_EVERY = 1000  # VMAFX_SIDECAR_MIN_SAMPLES_CKPT
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
    def __init__(self, workdir: Path, profile_out: Path | None):
        self.workdir = workdir
        self.sockdir = tempfile.mkdtemp(prefix="vxb")  # AF_UNIX paths are limited to ~107 bytes
        self.socket = os.path.join(self.sockdir, "s.sock")
        self.checkpoint_dir = workdir / "ckpt"
        self.stderr_path = workdir / "server.log"
        self.profile_out = profile_out
        self.env = server_env(self.socket, self.checkpoint_dir, VMAFX_SIDECAR_MIN_SAMPLES_CKPT=str(CKPT_EVERY))
        self.proc: subprocess.Popen | None = None
        self.ready_s: float | None = None

    def start(self, timeout: float = 30.0) -> None:
        """Start the server and wait until it answers a ping; ready_s is how long that took."""
        profile = ("-m", "cProfile", "-o", str(self.profile_out)) if self.profile_out else ()
        self.stderr_file = open(self.stderr_path, "wb")
        started = time.perf_counter()
        try:
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


def client_main(path: str, client: int, lines: list[bytes], barrier, results) -> None:
    """One node connection: send a line, wait for its ACK, repeat. Runs in its own process."""
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
        errors, first_error, checkpoints, trained = 0, None, 0, 0
        for i, raw in enumerate(acks):
            expected = f"job-{client}-{i:06d}"
            try:
                ack = json.loads(raw)
                good = ack.get("ok") is True and ack.get("job_id") == expected
            except ValueError:
                ack, good = raw, False
            if not good:
                errors += 1
                first_error = first_error or f"message {i} ({expected}): ACK {ack!r}"
                continue
            checkpoints += bool(ack.get("checkpoint"))
            trained += bool(ack.get("trained"))
        results.put(dict(client=client, start=start, end=end, latencies=latencies.tobytes(), cpu=cpu,
                         errors=errors, first_error=first_error, checkpoints=checkpoints, trained=trained))
    except BaseException as e:  # report, so that the parent does not wait forever
        results.put(dict(client=client, crashed=f"{type(e).__name__}: {e}"))
        raise


# ---- one configuration ----

@dataclass
class Run:
    clients: int
    messages: int = 0
    wall_s: float = 0.0
    latencies_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    machine_cpu_s: float = 0.0
    checkpoint_acks: int = 0
    trained_acks: int = 0
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


def run_config(n_clients: int, lines_per_client: list[list[bytes]], profile_dir: Path | None) -> Run:
    run = Run(n_clients, messages=sum(map(len, lines_per_client)))
    with tempfile.TemporaryDirectory(prefix="vmafx-bench-") as tmp:
        profile_out = profile_dir / f"server-{n_clients}c.prof" if profile_dir else None
        server = Server(Path(tmp), profile_out)
        try:
            server.start()
            run.ready_s = server.ready_s
            ctx = mp.get_context("fork")  # the pre-encoded lines reach the children without pickling
            barrier = ctx.Barrier(n_clients + 1)
            results = ctx.Queue()
            procs = [ctx.Process(target=client_main, args=(server.socket, c, lines, barrier, results))
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
            run.trained_acks = sum(r["trained"] for r in reports)
            try:
                run.server_status = server.request({"op": "status"})
            except (OSError, ValueError):
                run.server_status = None
            run.peak_rss_kb = status_kb(server.proc.pid, "VmHWM")
            run.exit_code = server.stop()
            log = server.log()
            run.checkpoint_ms = [float(m.group(4)) for m in CHECKPOINT_LINE.finditer(log)]
            run.checkpoint_files = sum(1 for d in (server.checkpoint_dir, server.checkpoint_dir / "quarantine")
                                       for n in os.listdir(d) if re.fullmatch(r"model_v\d{6,}\.onnx", n))
            if run.exit_code != 0:
                print(f"warning: server ({n_clients} clients) exited with {run.exit_code}; log tail:\n"
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

def measure_train_step(steps: int = 5000, warmup: int = 500) -> tuple[float, float, str]:
    """Median and p99 of Trainer.step() in µs, with the Trainer built the way serve() builds it."""
    with tempfile.TemporaryDirectory(prefix="vmafx-bench-step-") as tmp:
        config = vs.Config.load({"VMAFX_SIDECAR_CHECKPOINT_DIR": tmp, "VMAFX_BASE_MODEL_PATH": "",
                                 "VMAFX_SIDECAR_MIN_SAMPLES_CKPT": str(10**15)}, {})
        trainer, _ = vs.build_trainer(config)
        data = np.random.default_rng(7)
        x = data.uniform(0, 1, (4096, config.n_features)).astype(np.float32)
        y = data.uniform(20, 100, 4096).astype(np.float32)
        for i in range(0, config.replay_capacity, len(x)):  # a full replay buffer, as in steady state
            n = min(len(x), config.replay_capacity - i)
            trainer.replay.extend(x[:n], y[:n])
        n_new = trainer.n_new
        times = np.zeros(steps, np.int64)
        clock = time.perf_counter_ns
        for i in range(warmup + steps):
            j = (i * n_new) % (len(x) - n_new)
            trainer.pending_x[:] = x[j:j + n_new]  # what add() leaves pending for the step
            trainer.pending_y[:] = y[j:j + n_new]
            t0 = clock()
            trainer.step()
            t1 = clock()
            if i >= warmup:
                times[i - warmup] = t1 - t0
        shape = (f"batch {config.batch_size} ({n_new} new + {trainer.n_replay} replay), "
                 f"{'-'.join(map(str, trainer.model.sizes))}")
        return float(np.median(times)) / 1e3, float(np.percentile(times, 99)) / 1e3, shape


# ---- the report ----

def fmt_int(v: float) -> str:
    return f"{v:,.0f}".replace(",", " ")


def cell(text: str, ok: bool | None) -> str:
    return text + (" ✗" if ok is False else "")


def print_table(runs: list[Run], step: tuple[float, float, str], messages: int) -> None:
    by = {r.clients: r for r in runs}
    cols = sorted(by)
    header = ["figure"] + [f"{c} connection{'s' if c != 1 else ''}" for c in cols] + ["target"]
    rows: list[list[str]] = []

    def row(name: str, target: str, value, check=None) -> None:
        cells = []
        for c in cols:
            text = value(by[c])
            ok = check(by[c]) if check else None
            cells.append(cell(text, ok))
        rows.append([name] + cells + [target])

    def rate_ok(r: Run) -> bool | None:
        want = {1: 9000, 4: 20000}.get(r.clients)
        return None if want is None else r.rate >= want

    row("messages/s", ">= 9 000 (1 conn), >= 20 000 (4 conn)", lambda r: fmt_int(r.rate), rate_ok)
    row("ACK latency p50", "", lambda r: f"{r.latency_us(50):.0f} µs")
    row("ACK latency p99", "< 1 ms (4 conn)", lambda r: f"{r.latency_us(99):.0f} µs",
        lambda r: r.latency_us(99) < 1000 if r.clients == 4 else None)
    row("ACK latency max", "", lambda r: f"{r.latency_us(100) / 1e3:.1f} ms")
    row("server CPU s / 1000 msgs", "<= 0.06", lambda r: f"{r.server_cpu_s / r.messages * 1000:.3f}",
        lambda r: r.server_cpu_s / r.messages * 1000 <= 0.06)
    row("server CPU busy (of one core)", "", lambda r: f"{100 * r.server_cpu_s / r.wall_s:.0f} %")
    row("client CPU s / 1000 msgs (all clients)", "", lambda r: f"{r.client_cpu_s / r.messages * 1000:.3f}")
    row("other load on the machine during the run", "~0 cores (else rerun)",
        lambda r: f"{max(0.0, r.machine_cpu_s - r.server_cpu_s - r.client_cpu_s) / r.wall_s:.2f} cores")
    median_us, p99_us, shape = step
    text = f"{median_us:.1f} µs (p99 {p99_us:.0f})"
    rows.append([f"median train step, {shape} (in-process, once)"] +
                [cell(text, median_us < 60) for _ in cols] + ["< 60 µs"])

    def ckpt(fn):
        return lambda r: f"{fn(r.checkpoint_ms):.1f} ms" if r.checkpoint_ms else "n/a"

    row("checkpoint write, median", "< 20 ms", ckpt(statistics.median),
        lambda r: statistics.median(r.checkpoint_ms) < 20 if r.checkpoint_ms else None)
    row("checkpoint write, max", "< 20 ms", ckpt(max),
        lambda r: max(r.checkpoint_ms) < 20 if r.checkpoint_ms else None)
    row("server peak RSS (VmHWM)", "< 80 MB",
        lambda r: f"{r.peak_rss_kb / 1024:.1f} MB" if r.peak_rss_kb else "n/a",
        lambda r: r.peak_rss_kb / 1024 < 80 if r.peak_rss_kb else None)
    row("start to socket ready", "< 0.5 s", lambda r: f"{r.ready_s:.3f} s", lambda r: r.ready_s < 0.5)
    row("checkpoint ACKs / log lines / files", f"~{messages // CKPT_EVERY}",
        lambda r: f"{r.checkpoint_acks} / {len(r.checkpoint_ms)} / {r.checkpoint_files}")
    row("bad ACKs (not ok, wrong job_id or order)", "0", lambda r: str(r.errors), lambda r: r.errors == 0)

    markdown_table(header, rows)


def print_profile(path: Path, top: int = 25) -> None:
    import pstats
    print(f"\n### {path.name}: top {top} functions by tottime\n")
    pstats.Stats(str(path)).sort_stats("tottime").print_stats(top)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000, help="messages per configuration (default 20000)")
    parser.add_argument("--clients", default="1,4", help="comma-separated client counts (default 1,4)")
    parser.add_argument("--steps", type=int, default=5000, help="timed train steps (default 5000)")
    parser.add_argument("--float32-features", action="store_true",
                        help="send features in float32 shortest form (~9 digits) instead of 17-digit float64")
    parser.add_argument("--profile", metavar="DIR", type=Path,
                        help="run each server under cProfile, write DIR/server-<n>c.prof, print the top functions")
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
    if args.messages < 1 or not counts or min(counts) < 1:
        parser.error("--messages and each --clients count must be >= 1")
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)

    print(f"machine: {machine()}")
    print(f"messages per configuration: {args.messages}, clients: {', '.join(map(str, counts))}, features: "
          + ("float32 shortest form" if args.float32_features else "float64, 17 digits")
          + (" (servers under cProfile: figures are slowed by the profiler)" if args.profile else ""))

    step = measure_train_step(args.steps)

    runs = []
    for n in counts:
        per = [args.messages // n + (c < args.messages % n) for c in range(n)]
        lines = [make_lines(k, c, 1000 + c, args.float32_features) for c, k in enumerate(per)]  # encoded before the clock
        runs.append(run_config(n, lines, args.profile))
    print()
    print_table(runs, step, args.messages)
    for r in runs:
        if r.first_error:
            print(f"\n{r.clients} connection(s): first bad ACK: {r.first_error}")
        s = r.server_status
        if s is not None and s.get("samples_accepted") != r.messages:
            print(f"\n{r.clients} connection(s): server status says {s.get('samples_accepted')} samples "
                  f"accepted, expected {r.messages}")
    if args.profile:
        for n in counts:
            path = args.profile / f"server-{n}c.prof"
            if path.exists():
                print_profile(path)
            else:
                print(f"\nno profile written at {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
