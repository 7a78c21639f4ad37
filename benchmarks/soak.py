"""Soak test of vmafx-sidecar: steady load from several clients while the server is SIGKILLed and restarted.

    .venv/bin/python benchmarks/soak.py [--duration 600] [--clients 4] [--kill-every 30] [--seed 0]

For --duration seconds, --clients client processes each send one request line and wait for its ACK,
like the Go node. 5 % of the lines are malformed (not JSON, wrong feature count, a NaN literal, a
string among the features) and must get "ok": false; the rest are valid samples with unique job_ids.
On a dropped connection, a refused connect or EOF a client reconnects with a short backoff and resends
the line it has no ACK for, as the Go client does (so the server may accept such a line twice).

Every --kill-every seconds (jittered +-30 %) the server is SIGKILLed (its VmHWM read from /proc just
before) and restarted on the same checkpoint directory and socket, with CKPT_INTERVAL_S=0,
MIN_SAMPLES_CKPT=2000, JOURNAL_FSYNC=everysec and the gate off (the scores are random, so no candidate
would pass it, and every checkpoint is to be verified): a kill -9 is a process crash, so no acknowledged
sample may be lost. At the end the server is stopped with SIGTERM and started once more; its
`samples_accepted` must be at least the number of distinct job_ids the clients got "ok": true for
(the excess is resends whose first ACK died with a server). Then every checkpoint with a .sha256 is
checked (digest, onnx.checker, and an onnxruntime run when onnxruntime is importable) and a Markdown
table is printed. The exit status is 1 when any check fails (above all: acknowledged samples missing),
and the work directory (checkpoints, server log) is then kept for inspection.

Standard library and numpy only (plus onnx for the checkpoint checks); the server runs as
`python -m vmafx_sidecar serve` with PYTHONPATH at the repository root.
"""
from __future__ import annotations

import os

for _threads_var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_threads_var, "1")  # before numpy, as in the server

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import multiprocessing as mp  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from bench_ingest import fmt_int, machine, request, server_env, status_kb  # noqa: E402  (this folder is on sys.path)
import vmafx_sidecar as vs  # noqa: E402  (bench_ingest put the repository root on sys.path)

ROOT = Path(__file__).resolve().parent.parent
N_FEATURES = 80
MALFORMED_FRACTION = 0.05
MALFORMED_KINDS = ("not JSON", "wrong feature count", "NaN literal", "string in features")
MIN_SAMPLES_CKPT = 2000
ACK_TIMEOUT_S = 10.0  # a live server answers in milliseconds; longer counts as a hang
GIVE_UP_S = 60.0  # a client that cannot get a line ACKed for this long stops and reports it
BACKOFF_S = (0.01, 0.25)  # first and longest pause between reconnect attempts
START_TIMEOUT_S = 30.0
TERM_LIMIT_S = 2.0  # README: SIGTERM -> exit 0 within 2 s
CHECKPOINT_NAME = re.compile(r"model_v(\d{6,})\.onnx")


# ---- the server: one checkpoint dir and socket, started again after every kill ----

class Sidecar:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.sockdir = tempfile.mkdtemp(prefix="vxs")  # AF_UNIX paths are limited to ~107 bytes
        self.socket = os.path.join(self.sockdir, "s.sock")
        self.checkpoint_dir = workdir / "ckpt"
        self.log_path = workdir / "server.log"  # every incarnation appends here, after a marker line
        self.log_file = open(self.log_path, "ab")
        # GATE off: the scores are random, so the gate would rightly refuse every candidate; the soak is about
        # the files a crash leaves, and needs published checkpoints to verify.
        self.env = server_env(self.socket, self.checkpoint_dir, VMAFX_SIDECAR_MIN_SAMPLES_CKPT=str(MIN_SAMPLES_CKPT),
                              VMAFX_SIDECAR_JOURNAL_FSYNC="everysec", VMAFX_SIDECAR_GATE="off")
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> float:
        """Start a server and wait until it answers ping; returns the seconds that took."""
        self.starts += 1
        self.log_file.write(f"---- soak.py: start #{self.starts} at {time.strftime('%H:%M:%S')}\n".encode())
        self.log_file.flush()
        started = time.monotonic()
        try:
            self.proc = vs.start_server(self.env, START_TIMEOUT_S, stderr=self.log_file, cwd=self.workdir)
        except vs.ServerNotReady as e:
            raise RuntimeError(f"server start #{self.starts}: {e}:\n{self.log_tail()}") from None
        return time.monotonic() - started

    def request(self, message: dict, timeout: float = ACK_TIMEOUT_S) -> dict:
        return request(self.socket, message, timeout)

    def vmhwm_kb(self) -> int | None:
        return status_kb(self.proc.pid, "VmHWM") if self.proc else None

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def terminate(self) -> tuple[int, float]:
        """SIGTERM; returns (exit code, seconds to exit). Kills after 15 s."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            code = -9
        return code, time.monotonic() - started

    def log_tail(self, lines: int = 25) -> str:
        self.log_file.flush()
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log_file.close()
        shutil.rmtree(self.sockdir, ignore_errors=True)


# ---- the clients: one line in flight each, reconnect and resend on a dropped connection ----

class LineSource:
    """Request lines for one client: (bytes, job_id the ACK must echo or None, malformed kind or None)."""

    def __init__(self, client: int, seed: int):
        self.client = client
        self.rng = np.random.default_rng([seed, client])
        self.valid = 0
        self.bad = 0
        self.chunk: list[tuple[np.ndarray, float, int]] = []

    def refill(self) -> None:
        n = 512
        x = np.round(self.rng.uniform(0, 1, (n, N_FEATURES)), 6)
        y = np.round(self.rng.uniform(20, 100, n), 3)
        kinds = np.where(self.rng.random(n) < MALFORMED_FRACTION, self.rng.integers(0, len(MALFORMED_KINDS), n), -1)
        self.chunk = list(zip(x, y.tolist(), kinds.tolist()))[::-1]

    def next(self) -> tuple[bytes, str | None, str | None, int]:
        """(line, expected ACK job_id, malformed kind or None, valid sequence number or -1)."""
        if not self.chunk:
            self.refill()
        row, score, kind = self.chunk.pop()
        values = row.tolist()
        if kind < 0:
            seq, self.valid = self.valid, self.valid + 1
            job_id = f"soak-{self.client}-{seq:09d}"
            line = f'{{"job_id": "{job_id}", "features": {json.dumps(values)}, "true_score": {score!r}}}\n'
            return line.encode(), job_id, None, seq
        self.bad += 1
        job_id = f"soak-{self.client}-bad-{self.bad:08d}"
        name = MALFORMED_KINDS[kind]
        parts = [repr(v) for v in values]
        i = int(self.rng.integers(0, N_FEATURES))
        if name == "not JSON":  # cut in the middle of the array: no job_id can be echoed
            text = f'{{"job_id": "{job_id}", "features": [{", ".join(parts[:i + 1])}, '
            return text.encode() + b"\n", None, name, -1
        if name == "wrong feature count":
            parts = parts[:-1] if i % 2 else parts + ["0.5"]
        elif name == "NaN literal":
            parts[i] = "NaN"
        else:
            parts[i] = f'"{parts[i]}"'
        line = f'{{"job_id": "{job_id}", "features": [{", ".join(parts)}], "true_score": {score!r}}}\n'
        return line.encode(), job_id, name, -1


@dataclass
class ClientReport:
    client: int
    sends: int = 0  # send attempts, resends included
    acks: int = 0  # ACK lines received
    lines: int = 0  # distinct lines taken from the source
    valid_lines: int = 0
    malformed_lines: int = 0
    ok_acks: int = 0  # ok:true for a valid line, echoing its job_id
    distinct_ok: int = 0  # distinct job_ids with an ok:true ACK (from a bitmap)
    rejected: int = 0  # every ok:false ACK
    malformed_acked: int = 0  # malformed lines whose ACK arrived
    malformed_accepted: int = 0  # ok:true for a malformed line
    valid_rejected: int = 0  # ok:false for a valid line
    bad_acks: int = 0  # not JSON, wrong job_id, or neither ok:true nor ok:false
    first_bad: str | None = None
    resends: int = 0
    valid_resends: int = 0  # upper bound on duplicates the server may count
    unacked_valid_sent: int = 0  # a valid line sent but never ACKed (client stopped): may be counted too
    reconnects: int = 0
    ack_timeouts: int = 0
    checkpoint_acks: int = 0
    recovery_s: list[float] = field(default_factory=list)  # first send -> ACK of resent lines
    rejected_by_kind: dict = field(default_factory=dict)
    gave_up: str | None = None
    crashed: str | None = None
    start: float = 0.0
    end: float = 0.0

    def note_bad(self, text: str) -> None:
        self.bad_acks += 1
        self.first_bad = self.first_bad or text


def client_main(client: int, path: str, seed: int, stop, hard_deadline: float, ok_counts, results) -> None:
    report = ClientReport(client)
    try:
        run_client(report, path, seed, stop, hard_deadline, ok_counts)
    except BaseException as e:  # report, so that the parent does not wait forever
        report.crashed = f"{type(e).__name__}: {e}"
    report.end = time.monotonic()
    results.put(report)


def run_client(report: ClientReport, path: str, seed: int, stop, hard_deadline: float, ok_counts) -> None:
    source = LineSource(report.client, seed)
    acked = bytearray(1 << 16)  # one byte per valid sequence number, grown as needed
    sock: socket.socket | None = None
    reader = None
    report.start = time.monotonic()

    def drop() -> None:
        nonlocal sock, reader
        for f in (reader, sock):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        sock = reader = None

    try:
        while not stop.is_set() and time.monotonic() < hard_deadline:
            line, job_id, kind, seq = source.next()
            report.lines += 1
            if kind is None:
                report.valid_lines += 1
            else:
                report.malformed_lines += 1
            attempts, first_send, failing_since, backoff = 0, None, None, BACKOFF_S[0]
            raw = b""
            while True:  # until this line has its ACK; bounded by GIVE_UP_S of failures and the deadline
                now = time.monotonic()
                if failing_since is not None and (now - failing_since > GIVE_UP_S or now > hard_deadline):
                    report.gave_up = (f"no ACK for {job_id or 'a malformed line'} after {now - failing_since:.0f} s "
                                      f"of failures")
                    if kind is None and attempts:
                        report.unacked_valid_sent += 1
                    return
                if sock is None:
                    if failing_since is not None:
                        time.sleep(backoff * random.uniform(0.5, 1.0))
                        backoff = min(backoff * 2, BACKOFF_S[1])
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.settimeout(ACK_TIMEOUT_S)
                    try:
                        s.connect(path)
                    except OSError:  # ECONNREFUSED (killed), ENOENT (socket being replaced)
                        s.close()
                        failing_since = failing_since or time.monotonic()
                        continue
                    sock, reader = s, s.makefile("rb")
                    report.reconnects += 1
                try:
                    attempts += 1
                    report.sends += 1
                    first_send = first_send or time.monotonic()
                    sock.sendall(line)
                    raw = reader.readline()
                    if not raw.endswith(b"\n"):
                        raise ConnectionResetError(f"EOF after {raw!r:.60}")
                    break
                except TimeoutError:
                    report.ack_timeouts += 1
                    drop()
                    failing_since = failing_since or time.monotonic()
                except OSError:  # EOF, ECONNRESET, EPIPE: the server died with the line in flight
                    drop()
                    failing_since = failing_since or time.monotonic()
            if attempts > 1:
                report.resends += attempts - 1
                if kind is None:
                    report.valid_resends += attempts - 1
                report.recovery_s.append(time.monotonic() - first_send)
            check_ack(report, raw, job_id, kind, seq, acked)
            ok_counts[report.client] = report.ok_acks
    finally:
        drop()
        report.reconnects = max(0, report.reconnects - 1)  # the first connect is not a reconnect
        report.distinct_ok = sum(acked)


def check_ack(report: ClientReport, raw: bytes, job_id: str | None, kind: str | None, seq: int,
              acked: bytearray) -> None:
    report.acks += 1
    try:
        ack = json.loads(raw)
    except ValueError:
        report.note_bad(f"ACK is not JSON: {raw!r:.120}")
        return
    if not isinstance(ack, dict):
        report.note_bad(f"ACK is not an object: {raw!r:.120}")
        return
    ok = ack.get("ok")
    if ok is False:
        report.rejected += 1
    if ack.get("job_id") != job_id:
        report.note_bad(f"ACK for {job_id!r} carries job_id {ack.get('job_id')!r}: {raw!r:.160}")
        return
    if kind is None:
        if ok is True:
            report.ok_acks += 1
            if seq >= len(acked):
                acked.extend(bytes(max(seq + 1 - len(acked), len(acked))))
            acked[seq] = 1
            report.checkpoint_acks += bool(ack.get("checkpoint"))
        elif ok is False:
            report.valid_rejected += 1
            report.first_bad = report.first_bad or f"valid line {job_id} rejected: {raw!r:.200}"
        else:
            report.note_bad(f"ACK without ok true/false: {raw!r:.160}")
        return
    report.malformed_acked += 1
    if ok is False:
        report.rejected_by_kind[kind] = report.rejected_by_kind.get(kind, 0) + 1
    elif ok is True:
        report.malformed_accepted += 1
        report.first_bad = report.first_bad or f"malformed line ({kind}) accepted: {raw!r:.160}"
    else:
        report.note_bad(f"ACK without ok true/false: {raw!r:.160}")


# ---- checkpoints on disk ----

@dataclass
class CheckpointCheck:
    files: int = 0  # model_vNNNNNN.onnx
    with_sha: int = 0
    verified: int = 0
    orphans: int = 0  # .onnx without .sha256: a kill between the two renames (readers ignore these)
    failures: list[str] = field(default_factory=list)
    runtime: str = "onnx.checker only (onnxruntime not importable)"
    steps_monotonic: bool = True
    temp_files: list[str] = field(default_factory=list)
    max_version: int = 0


def check_checkpoints(directory: Path) -> CheckpointCheck:
    import onnx
    try:
        import onnxruntime as ort
    except ImportError:
        ort = None
    result = CheckpointCheck()
    if ort is not None:
        result.runtime = f"onnx.checker + onnxruntime {ort.__version__}"
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
    names = sorted(os.listdir(directory))
    result.temp_files = [n for n in names if n.startswith(".model_v")]
    x = np.random.default_rng(0).uniform(0, 1, (8, N_FEATURES)).astype(np.float32)
    last_step = -1
    for name in names:
        m = CHECKPOINT_NAME.fullmatch(name)
        if not m:
            continue
        result.files += 1
        version = int(m.group(1))
        result.max_version = max(result.max_version, version)
        path = directory / name
        sha_path = directory / (name + ".sha256")
        if not sha_path.exists():
            result.orphans += 1
            continue
        result.with_sha += 1
        try:
            data = path.read_bytes()
            expected = sha_path.read_text().split()
            if expected != [hashlib.sha256(data).hexdigest(), name]:
                raise ValueError(f"digest mismatch: {sha_path.name} says {' '.join(expected)!r:.100}")
            model = onnx.load_from_string(data)
            onnx.checker.check_model(model, full_check=True)
            meta = {p.key: p.value for p in model.metadata_props}
            if meta.get("version") != str(version):
                raise ValueError(f"metadata version {meta.get('version')!r}")
            step = int(meta.get("step", -1))
            if step < last_step:
                result.steps_monotonic = False
            last_step = step
            if ort is not None:
                session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
                (score,) = session.run(None, {"features": x})
                if score.shape != (len(x), 1) or not np.all(np.isfinite(score)):
                    raise ValueError(f"onnxruntime output shape {score.shape}, finite {np.isfinite(score).all()}")
            result.verified += 1
        except Exception as e:  # noqa: BLE001  every failure is reported by name
            result.failures.append(f"{name}: {type(e).__name__}: {e}")
    latest = directory / "latest.json"
    if latest.exists():  # it must only ever name a published checkpoint that is whole
        try:
            record = json.loads(latest.read_bytes())
            if hashlib.sha256((directory / record["file"]).read_bytes()).hexdigest() != record["sha256"]:
                raise ValueError(f"{record['file']} does not have the sha256 latest.json names")
        except Exception as e:  # noqa: BLE001
            result.failures.append(f"latest.json: {type(e).__name__}: {e}")
    return result


# ---- the server log ----

def log_summary(text: str) -> tuple[Counter, int, Counter]:
    """(warning/error messages with numbers blanked -> count, journal records replayed, notable events)."""
    kinds: Counter = Counter()
    replayed = 0
    events: Counter = Counter()
    for line in text.splitlines():
        if m := re.search(r"(\d+) journal records replayed", line):
            replayed += int(m.group(1))
        if " WARNING " in line or " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback"):
            message = line.split(": ", 1)[1] if ": " in line and not line.startswith("Traceback") else line
            level = "ERROR" if " ERROR " in line or " CRITICAL " in line else (
                "Traceback" if line.startswith("Traceback") else "WARNING")
            message = re.sub(r"/\S+", "<path>", message)
            message = re.sub(r"\d+(\.\d+)?", "N", message)
            kinds[f"{level}: {message}"] += 1
        if "moved to" in line and "state file" in line:
            events["state file moved aside"] += 1
        if line.startswith("Traceback"):
            events["traceback"] += 1
        if " ERROR " in line:
            events["error lines"] += 1
    return kinds, replayed, events


def restored_counts(text: str) -> dict[int, int]:
    """Server start number -> samples accepted when it resumed (from its "resumed: ..." log line)."""
    counts, start = {}, 0
    for line in text.splitlines():
        if m := re.match(r"---- soak\.py: start #(\d+)", line):
            start = int(m.group(1))
        elif "resumed" in line and (m := re.search(r"(\d+) samples accepted so far", line)):
            counts[start] = int(m.group(1))
    return counts


# ---- the run ----

@dataclass
class Restart:
    vmhwm_kb: int | None
    acked_before_kill: int  # ok ACKs the clients had received before the SIGKILL
    accepted_after: int | None  # samples_accepted from status right after the restart (clients already back)
    down_s: float  # SIGKILL -> ping answered
    start: int  # the server start number (marker in the log)
    restored: int | None = None  # "N samples accepted so far" of that start's "resumed" log line

    @property
    def accepted(self) -> int | None:
        """What the server held right after the restart: the logged restore count, else the status."""
        return self.restored if self.restored is not None else self.accepted_after


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600, help="seconds of load (default 600)")
    parser.add_argument("--clients", type=int, default=4, help="client processes (default 4)")
    parser.add_argument("--kill-every", type=float, default=30,
                        help="seconds between SIGKILLs, jittered +-30%% (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the kill times (default 0)")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.clients < 1 or args.kill_every <= 0:
        parser.error("--duration and --kill-every must be > 0, --clients >= 1")

    wall_started = time.monotonic()
    print(f"machine: {machine()}")
    print(f"soak: {args.duration:g} s, {args.clients} clients, SIGKILL every {args.kill_every:g} s +-30 %, "
          f"seed {args.seed}; {MALFORMED_FRACTION:.0%} malformed lines; CKPT_INTERVAL_S=0, "
          f"MIN_SAMPLES_CKPT={MIN_SAMPLES_CKPT}, JOURNAL_FSYNC=everysec", flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="vmafx-soak-"))
    server = Sidecar(workdir)
    ctx = mp.get_context("fork")
    stop = ctx.Event()
    procs: list = []
    keep = False
    try:
        server.start()
        results = ctx.Queue()
        ok_counts = ctx.RawArray("q", args.clients)
        t0 = time.monotonic()
        hard_deadline = t0 + args.duration + GIVE_UP_S + 60
        procs = [ctx.Process(target=client_main,
                             args=(c, server.socket, args.seed, stop, hard_deadline, ok_counts, results))
                 for c in range(args.clients)]
        for p in procs:
            p.start()

        kill_rng = random.Random(args.seed)
        jitter = lambda: args.kill_every * kill_rng.uniform(0.7, 1.3)  # noqa: E731
        end = t0 + args.duration
        next_kill = t0 + jitter()
        restarts: list[Restart] = []
        unexpected_exits: list[str] = []
        while (now := time.monotonic()) < end:  # bounded by --duration
            time.sleep(max(0.0, min(end, next_kill, now + 0.2) - now))
            if server.proc.poll() is not None:  # died on its own: report it, then carry on
                unexpected_exits.append(f"exit {server.proc.returncode} at {time.monotonic() - t0:.1f} s:\n"
                                        + server.log_tail(15))
                server.start()
                continue
            if time.monotonic() >= next_kill and time.monotonic() < end:
                hwm = server.vmhwm_kb()
                acked_before = sum(ok_counts)
                server.kill()
                killed_at = time.monotonic()
                server.start()
                down_s = time.monotonic() - killed_at
                try:
                    accepted_after = server.request({"op": "status"})["samples_accepted"]
                except (OSError, ValueError, KeyError):
                    accepted_after = None
                restarts.append(Restart(hwm, acked_before, accepted_after, down_s, server.starts))
                print(f"  {time.monotonic() - t0:6.1f} s: SIGKILL #{len(restarts)} (VmHWM "
                      f"{(hwm or 0) / 1024:.1f} MB, {acked_before} ok ACKs so far), back in {down_s:.2f} s, "
                      f"samples_accepted {accepted_after}", flush=True)
                next_kill = time.monotonic() + jitter()

        stop.set()
        reports: list[ClientReport] = []
        for _ in procs:
            reports.append(results.get(timeout=GIVE_UP_S + 60))
        load_s = max(r.end for r in reports) - t0
        for p in procs:
            p.join(timeout=30)

        status_before_term = server.request({"op": "status"})
        final_hwm = server.vmhwm_kb()
        term1 = server.terminate()
        server.start()  # the final clean start, after a SIGTERM
        status = server.request({"op": "status"})
        ckpt = check_checkpoints(server.checkpoint_dir)  # also lists the temp files left after this start
        state_files = sorted(os.listdir(server.checkpoint_dir / ".state"))
        term2 = server.terminate()
        log_text = server.log_path.read_text(errors="replace")
    except BaseException:
        keep = True
        stop.set()
        print(f"\nsoak aborted; server log tail:\n{server.log_tail()}\n(work directory kept: {workdir})",
              file=sys.stderr)
        raise
    finally:
        for p in procs:  # only our own client processes, by their handles
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        server.cleanup()

    # ---- the figures ----
    total = lambda attr: sum(getattr(r, attr) for r in reports)  # noqa: E731
    distinct_ok = total("distinct_ok")
    accepted = status["samples_accepted"]
    missing = max(0, distinct_ok - accepted)
    excess = accepted - distinct_ok
    dup_bound = total("valid_resends") + total("unacked_valid_sent")
    rejected, malformed_acked = total("rejected"), total("malformed_acked")
    acks = total("acks")
    restored = restored_counts(log_text)
    for r in restarts:
        r.restored = restored.get(r.start)
    per_restart_loss = [f"restart {i}: {r.accepted} samples after it, {r.acked_before_kill} ok ACKs before the kill"
                        for i, r in enumerate(restarts, 1) if r.accepted is None or r.accepted < r.acked_before_kill]
    # At most one unACKed line per client can be in the server when it dies, so a larger excess at a
    # restart means the server counted samples twice there (the excess can include a few ACKs that
    # arrived between reading the clients' counters and the SIGKILL).
    excess_at = [None if r.restored is None else r.restored - r.acked_before_kill for r in restarts]
    hwms = [r.vmhwm_kb / 1024 for r in restarts if r.vmhwm_kb]
    downs = [r.down_s for r in restarts]
    recovery = [s for r in reports for s in r.recovery_s]
    kinds, replayed, events = log_summary(log_text)
    moved_aside = [n for n in state_files if n not in ("snapshot.bin", "journal.bin", ".snapshot.bin.tmp")]
    by_kind = Counter()
    for r in reports:
        by_kind.update(r.rejected_by_kind)
    crashed = [f"client {r.client}: {r.crashed}" for r in reports if r.crashed]
    gave_up = [f"client {r.client}: {r.gave_up}" for r in reports if r.gave_up]
    first_bad = next((r.first_bad for r in reports if r.first_bad), None)

    rows: list[tuple[str, str, str, bool | None]] = []  # figure, value, must be, ok
    notes: list[str] = []

    def row(name: str, value: str, target: str = "", ok: bool | None = None) -> None:
        rows.append((name, value, target, ok))

    def mmm(values: list[float], unit: str, digits: int = 1) -> str:
        if not values:
            return "n/a"
        return (f"{min(values):.{digits}f} / {statistics.median(values):.{digits}f} / "
                f"{max(values):.{digits}f} {unit} (n={len(values)})")

    row("duration (load phase)", f"{load_s:.1f} s (asked {args.duration:g} s)")
    row("clients", str(args.clients))
    row("messages sent (resends included)", f"{fmt_int(total('sends'))} ({fmt_int(total('resends'))} resends "
        f"after {fmt_int(total('reconnects'))} reconnects)")
    row("lines: valid / malformed", f"{fmt_int(total('valid_lines'))} / {fmt_int(total('malformed_lines'))}")
    row("ACKed ok:true (distinct job_ids)", fmt_int(distinct_ok))
    row("rejected (ok:false)", f"{fmt_int(rejected)} (" + ", ".join(f"{k} {v}" for k, v in sorted(by_kind.items()))
        + ")", f"= malformed lines ACKed ({fmt_int(malformed_acked)})", rejected == malformed_acked)
    row("valid rejected / malformed accepted / bad ACKs",
        f"{total('valid_rejected')} / {total('malformed_accepted')} / {total('bad_acks')}", "0 / 0 / 0",
        total("valid_rejected") + total("malformed_accepted") + total("bad_acks") == 0)
    row("acknowledged samples missing after restarts", fmt_int(missing), "0", missing == 0)
    row("server samples_accepted (after SIGTERM + clean start)",
        f"{fmt_int(accepted)} (distinct ok {'+' if excess >= 0 else '-'} {abs(excess)})",
        f">= distinct ok; duplicates <= valid resends ({dup_bound})", missing == 0 and excess <= dup_bound)
    if excess > dup_bound:
        notes.append(f"the server counts {excess} samples more than the clients got ok:true for, but only "
                     f"{dup_bound} valid lines were resent: {excess - dup_bound} samples were counted (and "
                     f"trained) twice by the server, not by the clients; see the per-restart excess above")
    row("accepted right after each restart >= ok ACKs before that kill",
        f"{len(restarts) - len(per_restart_loss)} of {len(restarts)} restarts", "all", not per_restart_loss)
    row("restored samples_accepted - ok ACKs before the kill, per restart",
        ", ".join("?" if e is None else str(e) for e in excess_at) or "n/a",
        f"~<= {args.clients}, lines in flight (not checked: ACKs between the count and the kill add to it)")
    same = (status_before_term["samples_accepted"], status_before_term["samples_rejected"]) == (
        status["samples_accepted"], status["samples_rejected"])
    row("counters across the SIGTERM restart (accepted, rejected)",
        f"{status_before_term['samples_accepted']}, {status_before_term['samples_rejected']} -> "
        f"{status['samples_accepted']}, {status['samples_rejected']}", "unchanged", same)
    row("server samples_rejected (journaled like accepted samples)",
        f"{fmt_int(status['samples_rejected'])} (clients got {fmt_int(rejected)} ok:false)",
        ">= ok:false ACKs received", status["samples_rejected"] >= rejected)
    row("restarts (SIGKILL)", f"{len(restarts)}; unexpected server exits: {len(unexpected_exits)}",
        "no unexpected exits", not unexpected_exits)
    row("restart: SIGKILL -> ping answered, min / median / max", mmm(downs, "s", 2))
    row("resent line: first send -> ACK, min / median / max", mmm(recovery, "s", 2))
    row("journal records replayed at starts (total)", fmt_int(replayed))
    row("checkpoints written (files on disk)",
        f"{ckpt.files} (highest v{ckpt.max_version:06d}; {ckpt.orphans} .onnx without .sha256; "
        f"{total('checkpoint_acks')} checkpoint ACKs)")
    row("checkpoints verified", f"{ckpt.verified} of {ckpt.with_sha} with .sha256 ({ckpt.runtime}; steps "
        f"{'non-decreasing' if ckpt.steps_monotonic else 'DECREASE somewhere'} by version)",
        "all, steps non-decreasing", ckpt.verified == ckpt.with_sha and ckpt.with_sha > 0 and ckpt.steps_monotonic)
    row("leftover temp files (.model_v*) after the final clean start", str(len(ckpt.temp_files)), "0",
        not ckpt.temp_files)
    row("state files moved aside (corrupt / incompatible snapshot)", str(len(moved_aside)), "0", not moved_aside)
    row("peak RSS per restart (VmHWM before SIGKILL), min / median / max",
        mmm(hwms, "MB") + (f"; final run {final_hwm / 1024:.1f} MB" if final_hwm else ""))
    row("messages/s overall (ACKs received / load phase)", fmt_int(acks / load_s) if load_s else "n/a")
    row("SIGTERM: exit code, seconds (end of load; after clean start)",
        f"{term1[0]}, {term1[1]:.2f} s; {term2[0]}, {term2[1]:.2f} s", f"0 within {TERM_LIMIT_S:g} s",
        term1[0] == 0 and term2[0] == 0 and max(term1[1], term2[1]) <= TERM_LIMIT_S)
    row("ACK timeouts (> 10 s) / clients that gave up or crashed",
        f"{total('ack_timeouts')} / {len(gave_up) + len(crashed)}", "0 / 0",
        total("ack_timeouts") == 0 and not gave_up and not crashed)
    row("server log: error lines / tracebacks", f"{events['error lines']} / {events['traceback']}", "0 / 0",
        events["error lines"] == 0 and events["traceback"] == 0)

    header = ("figure", "value", "must be")
    table = [(n, v + (" ✗" if ok is False else ""), t) for n, v, t, ok in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *table)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    print()
    print(f"machine: {machine()}")
    print()
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for t in table:
        print(line(t))

    failed = [n for n, _, _, ok in rows if ok is False]
    print()
    if kinds:
        print("server warnings and errors (numbers blanked):")
        for message, count in kinds.most_common(12):
            print(f"  {count:5d} × {message[:160]}")
    for text in [*notes, first_bad, *crashed, *gave_up, *unexpected_exits[:3], *ckpt.failures[:5], *per_restart_loss[:5],
                 *(f"moved aside: {n}" for n in moved_aside), *(f"temp file left: {n}" for n in ckpt.temp_files[:5])]:
        if text:
            print(f"  ! {text}")
    keep = bool(failed)
    print(f"\nresult: {'FAIL (' + '; '.join(failed) + ')' if failed else 'PASS'}; "
          f"whole script took {time.monotonic() - wall_started:.0f} s"
          + (f"; work directory kept: {workdir}" if keep else ""))
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
