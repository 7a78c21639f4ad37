"""vmafx_feedback: the producer side of the vmafx-sidecar socket, standard library only.

What runs in other processes than the sidecar imports this module alone: the pod's health probe and Python
producers (FeedbackClient); the `send` and `status` commands' code is here too, though they run through
vmafx_sidecar's command line, which loads numpy and onnx. Importing this module loads neither numpy nor
onnx and leaves the environment alone (vmafx_sidecar pins BLAS pools to one thread, which a producer
would pass on to every encoder it launches). vmafx_sidecar imports this module, never the reverse.

Sections follow the data: shared (what both ends of the socket agree on) -> probe (one ping) -> client
(FeedbackClient: samples checked as the sidecar would, delivered from a background thread) -> send
(backfill from files) and status.
"""
from __future__ import annotations

import argparse
import codecs
import collections
import csv
import datetime
import io
import json
import logging
import math
import os
import re
import select
import socket
import stat
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import numpy  # for annotations only: this module never imports numpy

# The sidecar's logger name: producers configured logging for the client's warnings before this module.
log = logging.getLogger("vmafx_sidecar")


# ---- shared: what both ends of the socket agree on ----

SOCKET_ENV = "VMAFX_SIDECAR_SOCKET"
DEFAULT_SOCKET = "/tmp/vmafx-sidecar.sock"
PONG = b'{"ok": true, "op": "pong"}\n'
F32_MAX = 3.4028234663852886e38  # float(numpy.finfo(numpy.float32).max): the largest value the model takes
# The largest number float32 rounds to a finite value (F32_MAX), which both ends check: past F32_MAX by just under
# half its ulp, so that F32_MAX's own shortest form, 3.4028235e+38 (as Go writes a float32), is taken.
F32_BOUND = 3.4028235677973362e38
JOB_ID_MAX_BYTES = 65535  # a job_id's UTF-8 length, which the sidecar's sample log stores in 16 bits
JOB_ID_TOO_LONG = f"job_id: longer than {JOB_ID_MAX_BYTES} bytes in UTF-8"  # both ends' words
LINE_TOO_LONG = "line too long (limit {} bytes)"  # both ends' words, with VMAFX_SIDECAR_MAX_LINE_BYTES
# What both ends call a value's type in an error: its JSON name (json.dumps sends a tuple as an array).
JSON_TYPE_NAMES = {dict: "object", list: "array", tuple: "array", str: "string", bool: "boolean",
                   type(None): "null", int: "number", float: "number"}


# ---- probe: the pod's health check, one ping, answered without numpy or onnx ----
# Kubernetes runs it every few seconds beside the encoders: 0.04 s of CPU this way, 0.5 s after the imports.

PROBE_HELP = "exit 0 when the sidecar answers a ping within the timeout, else 1 (for health probes)"
CONNECT_RETRY_S = 0.01  # while the sidecar's listen backlog is full
# Longer than any answer of the sidecar's (an ACK's escaped job_id takes at most 400 KB, a status a few): a line past
# it is not the sidecar's, and is not read on, since a peer that never ends its line would take all memory.
ANSWER_MAX_BYTES = 1 << 20
NOT_AN_ANSWER = f"an answer longer than {ANSWER_MAX_BYTES} bytes: not the sidecar's"


def ask(path: str, request: bytes, timeout_s: float) -> bytes:
    """Send one request line to the sidecar at `path` and return its answer line (what came before the
    connection closed, if it closed first); OSError if it has not come whole within `timeout_s` in all."""
    deadline = time.monotonic() + timeout_s
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(timeout_s)
        connect_before(client, path, deadline)
        client.sendall(request)
        answer = bytearray()
        while not answer.endswith(b"\n"):
            if len(answer) > ANSWER_MAX_BYTES:
                raise OSError(NOT_AN_ANSWER)
            client.settimeout(seconds_left(deadline))
            if not (data := client.recv(65536)):
                break
            answer += data
        return bytes(answer)


def connect_before(client: socket.socket, path: str, deadline: float) -> None:
    """client.connect(path), waiting until `deadline` while the sidecar's listen backlog is full (a loop held up by
    a checkpoint, say): a timed AF_UNIX connect then fails at once with EAGAIN, where one to TCP would wait."""
    while True:
        try:
            return client.connect(path)
        except BlockingIOError:
            if time.monotonic() + CONNECT_RETRY_S >= deadline:
                raise
            time.sleep(CONNECT_RETRY_S)


def probe(path: str, timeout_s: float) -> int:
    try:
        answer = ask(path, b'{"op":"ping"}\n', timeout_s)
    except OSError as e:
        print(f"vmafx-sidecar probe: {path}: {e.strerror or e}", file=sys.stderr)
        return 1
    if answer != PONG:
        print(f"vmafx-sidecar probe: {path}: unexpected answer {answer[:200]!r}", file=sys.stderr)
        return 1
    return 0


def add_probe_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--socket", type=socket_path, default=os.environ.get(SOCKET_ENV, DEFAULT_SOCKET),
                        help=f"socket path (default ${SOCKET_ENV} or %(default)s)")
    parser.add_argument("--timeout", type=wait_seconds, default=2.0, help="seconds to wait (default 2)")
    return parser


def socket_path(text: str) -> str:
    """argparse type: the sidecar's socket path, as its own setting takes it (so that an empty $SOCKET_ENV
    is named, not answered with connect()'s 'Invalid argument')."""
    if not text or text != text.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected a socket path, not empty, without spaces or line "
                                         f"breaks around it (from --socket or ${SOCKET_ENV})")
    return text


def wait_seconds(text: str) -> float:
    """argparse type: a timeout a socket takes, more than 0 and at most a day."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= 86400:
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds, more than 0 and at most 86400")
    return seconds


def probe_main(argv: list[str]) -> int:
    """`vmafx-sidecar probe ARGS`, which vmafx_sidecar runs this way before it imports numpy and onnx."""
    args = add_probe_arguments(argparse.ArgumentParser(prog="vmafx-sidecar probe", description=PROBE_HELP))
    args = args.parse_args(argv)
    return probe(args.socket, args.timeout)


# ---- client: FeedbackClient, the node's delivery contract for Python producers ----

CLIENTS: weakref.WeakSet[FeedbackClient] = weakref.WeakSet()  # for a fork()ed child, which begins them again

FEEDBACK_RETRY_S = (2.0, 120.0)  # first reconnect delay, doubled after each failure up to the second
FEEDBACK_ACK_DEADLINE_S = 2.0  # for each answer; past it the connection is dropped and the sample resent
FEEDBACK_STATUS_REQUEST = b'{"op":"status"}\n'
RECV_BYTES = 65536
FEEDBACK_METRICS = (
    ("delivered", "Feedback samples the sidecar acknowledged."),
    ("dropped", "Feedback samples not delivered: queue full, client closed, an unexpected error, or still queued at "
                "close."),
    ("rejected", "Feedback samples refused as malformed, locally or by the sidecar."),
)


class InvalidSample(ValueError):
    """A sample the sidecar would reject; the message is the error it would answer."""


class FeedbackConnectionLost(Exception):
    """A request failed on the wire; `written` when some of it may have reached the sidecar."""

    def __init__(self, why: str, written: bool):
        super().__init__(why)
        self.written = written


class FeedbackClient:
    """Sends (features, true_score) samples to the sidecar from a background thread, as vmafx-node does.

    send() never blocks and never raises: it checks the sample as the sidecar's parse_request would and
    queues a copy (the thread encodes it), or counts it. Every sample ends in one counter:
      delivered  the sidecar answered "ok": true;
      rejected   refused by send() (never sent; length only once n_features is known) or "ok": false;
      dropped    queue full, close() already called, an unexpected error in send() or in the thread's delivery
                 of it, or left when close() gave up.
    One connection, one sample in flight: write its line, wait up to FEEDBACK_ACK_DEADLINE_S for its ACK.
    After a failure the thread reconnects in FEEDBACK_RETRY_S[0] seconds, doubling up to FEEDBACK_RETRY_S[1],
    back to the first after an ACK; close() ends a pause at once and retries every FEEDBACK_RETRY_S[0] seconds.
    Each connection starts with {"op": "status"}, from which the client learns n_features and the line limit.
    The thread needs the GIL to encode and around each write and read: a producer that keeps the interpreter
    busy delays each by up to sys.getswitchinterval().

    Delivery is at least once; a sample send() accepted is lost or duplicated only in these cases:
      - queue full: send() returns False and counts it as dropped (`capacity` includes the one in flight);
      - close(timeout): what is still queued when the timeout expires is counted as dropped, including the
        sample in flight, which the sidecar may have received;
      - unknown delivery: the line was written, then the connection broke or the deadline passed before its
        ACK. The sample stays at the front of the queue and is sent again on the next connection; the
        sidecar counts it twice if only the ACK was lost. `resent` counts these, so the sidecar's
        samples_accepted exceeds `delivered` by at most `resent` (plus the one in flight at a close()
        timeout). A write that failed before any byte left is retried too, but cannot be a duplicate;
      - an unexpected error (a bug) in the thread's delivery of it: counted as dropped;
      - the process exits without close(): the queue goes with it, uncounted.
    In a child fork()ed from its process, a client starts again empty, with counters at zero and a thread of
    its own: what was queued is the parent's to deliver, and the parent's threads may have held its lock.
    """

    def __init__(self, socket_path: str | os.PathLike[str] | None = None, capacity: int = 1000) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if socket_path is None:
            socket_path = os.environ.get(SOCKET_ENV, DEFAULT_SOCKET)
        self.socket_path = os.fspath(socket_path)  # a pathlib.Path, which connect() takes for no AF_UNIX address
        self.capacity = capacity
        self.delivered = self.dropped = self.rejected = self.resent = 0
        self._queue: collections.deque[dict[str, Any]] = collections.deque()  # the head leaves once settled
        # Guards the queue, the counters, the flags and _sock. Taken as `with self._lock`: the Condition's own
        # __enter__ is Python code, where an exception from a signal handler (Ctrl-C, a SIGALRM job timeout) can
        # land after the lock is taken and before the block that releases it: every later send() then blocked.
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._closing = False  # close() was called: send() refuses
        self._stopping = False  # the thread stops at its next step
        self._sock: socket.socket | None = None
        self._inbuf = bytearray()
        self._n_features: int | None = None  # from the last status answer
        self._max_line: int | None = None
        self._reachable = True  # a failure streak is logged once, not per retry
        self._logged: set[str] = set()
        self._start()
        CLIENTS.add(self)

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="vmafx-feedback", daemon=True)
        self._thread.start()

    def _begin_again_in_child(self) -> None:
        """The client in a child fork() made: its own lock, queue, counters, connection and thread."""
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._queue.clear()
        self.delivered = self.dropped = self.rejected = self.resent = 0
        if self._sock is not None:
            self._sock.close()  # the child's copy of the parent's connection; the parent's stays open
            self._sock = None
        if not self._closing:
            self._start()

    def send(self, features: list[float] | tuple[float, ...] | numpy.ndarray, true_score: float,
             job_id: str | None = None) -> bool:
        """Queue one sample; False when it was rejected or dropped instead. Never blocks or raises."""
        try:
            try:
                message = feedback_message(features, true_score, job_id, self._n_features, self._max_line)
            except InvalidSample:
                if not self._limits_outlived():
                    raise
                message = feedback_message(features, true_score, job_id, None, None)  # for the sidecar to judge
        except InvalidSample as e:
            with self._lock:
                self.rejected += 1
            self._log_once("invalid", "feedback: sample refused (%s); later ones are only counted", e)
            return False
        except Exception as e:  # the caller is scoring video: a bug here must cost a sample, not the job
            with self._lock:
                self.dropped += 1
            self._log_once(type(e).__name__, "feedback: sample dropped on an unexpected error: %r", e)
            return False
        with self._lock:
            if not self._closing and len(self._queue) < self.capacity:
                self._queue.append(message)
                self._cond.notify_all()  # wakes the delivery thread
                return True
            self.dropped += 1
            why = "the client is closed" if self._closing else f"the queue is full ({self.capacity})"
        self._log_once(why, "feedback: sample dropped: %s; later ones are only counted", why)
        return False

    def _limits_outlived(self) -> bool:
        """Whether n_features and the line limit were learned on a connection that has ended since: the sidecar that
        said them stopped, and the next may have other settings (a rollout that changed them)."""
        with self._lock:
            if self._n_features is None:
                return False
            if self._sock is None:
                return True
            # Whether the sidecar's end has closed, without reading: a peek could wait out the socket's timeout once
            # the delivery thread took the byte that made it readable, and select() takes no descriptor past 1023.
            poller = select.poll()
            poller.register(self._sock, select.POLLIN)
            return any(events & (select.POLLHUP | select.POLLERR) for _, events in poller.poll(0))

    def close(self, timeout: float | None = 5.0) -> None:
        """Deliver what is queued for up to `timeout` seconds (None or math.inf: however long), then stop; what is
        left counts as dropped. Returns within the timeout, or at worst FEEDBACK_ACK_DEADLINE_S later (a connect
        that blocks)."""
        with self._lock:
            self._closing = True
            self._cond.notify_all()  # ends a backoff pause: the sidecar may be back
            # None, or past TIMEOUT_MAX (math.inf, say), is no bound: the lock's own wait would overflow.
            unbounded = timeout is None or timeout >= threading.TIMEOUT_MAX
            self._cond.wait_for(lambda: not self._queue or self._stopping, None if unbounded else timeout)
            self._stopping = True
            self._cond.notify_all()  # ends a backoff pause
            if self._sock is not None:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)  # ends an ACK wait
                except OSError:
                    pass
        self._thread.join()
        with self._lock:
            self.dropped += len(self._queue)
            self._queue.clear()

    def __enter__(self) -> FeedbackClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def metrics_text(self) -> str:
        """The counters in the Prometheus text format, under the names vmafx-node uses."""
        with self._lock:
            values = {name: getattr(self, name) for name, _ in FEEDBACK_METRICS}
        return "".join(f"# HELP vmafx_training_feedback_{name}_total {text}\n"
                       f"# TYPE vmafx_training_feedback_{name}_total counter\n"
                       f"vmafx_training_feedback_{name}_total {values[name]}\n" for name, text in FEEDBACK_METRICS)

    # -- the delivery thread

    def _run(self) -> None:
        delay = FEEDBACK_RETRY_S[0]
        try:
            while (message := self._next()) is not None:
                try:
                    delivered = (self._sock is not None or self._connect()) and self._deliver(feedback_line(message))
                except Exception as e:  # a bug here must cost that sample, not every later one
                    self._disconnect()
                    self._drop_head(e)
                    continue
                if delivered:
                    delay = FEEDBACK_RETRY_S[0]
                    continue
                with self._lock:  # a pause close() did not see begin ends with it: its timeout is for delivering
                    closing = self._closing
                    delay = FEEDBACK_RETRY_S[0] if closing else delay
                    self._cond.wait_for(lambda: self._stopping or self._closing != closing, delay)
                delay = FEEDBACK_RETRY_S[0] if self._closing else min(delay * 2, FEEDBACK_RETRY_S[1])
        finally:
            self._disconnect()

    def _drop_head(self, error: Exception) -> None:
        with self._lock:
            if self._queue:
                self._queue.popleft()
                self.dropped += 1
                self._cond.notify_all()
        self._log_once(type(error).__name__, "feedback: sample dropped on an unexpected error: %r", error)

    def _next(self) -> dict[str, Any] | None:
        """The head of the queue, once there is one; None when close() stops the thread."""
        with self._lock:
            self._cond.wait_for(lambda: self._queue or self._stopping)
            return None if self._stopping else self._queue[0]

    def _connect(self) -> bool:
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as e:  # out of file descriptors, say: the sidecar is out of reach until one frees
            self._unreachable(e)
            return False
        with self._lock:
            if self._stopping:
                sock.close()
                return False
            self._sock, self._inbuf = sock, bytearray()  # from now on close() can interrupt it
        try:
            sock.settimeout(FEEDBACK_ACK_DEADLINE_S)
            sock.connect(self.socket_path)
            config = self._request(FEEDBACK_STATUS_REQUEST)["config"]
            self._n_features, self._max_line = config["n_features"], config["max_line_bytes"]
        except (OSError, FeedbackConnectionLost, KeyError, TypeError) as e:
            self._disconnect()
            self._unreachable(e)
            return False
        return True

    def _deliver(self, line: bytes) -> bool:
        """Send the head of the queue and settle it by its ACK; False when the connection failed first."""
        try:
            ack = self._request(line)
        except FeedbackConnectionLost as e:
            self._disconnect()
            with self._lock:
                if e.written and not self._stopping:
                    self.resent += 1  # it stays at the head: the next connection sends it again
            self._unreachable(e)
            return False
        with self._lock:
            self._queue.popleft()
            if ack["ok"]:
                self.delivered += 1
            else:
                self.rejected += 1
            self._cond.notify_all()  # close() waits for an empty queue
        if not ack["ok"]:
            self._log_once("refused", "feedback: the sidecar refused a sample (%s); later ones are only "
                           "counted", ack.get("error"))
        if not self._reachable:
            self._reachable = True
            log.info("feedback: delivering to %s again", self.socket_path)
        return True

    def _request(self, line: bytes) -> dict[str, Any]:
        """Write one line and read its answer before the deadline."""
        sock, deadline, sent = self._sock, time.monotonic() + FEEDBACK_ACK_DEADLINE_S, 0
        try:
            while sent < len(line):
                sock.settimeout(seconds_left(deadline))
                sent += sock.send(line[sent:], socket.MSG_NOSIGNAL)  # a producer may not ignore SIGPIPE
            while (end := self._inbuf.find(b"\n")) < 0:
                if len(self._inbuf) > ANSWER_MAX_BYTES:
                    raise ConnectionError(NOT_AN_ANSWER)
                sock.settimeout(seconds_left(deadline))
                data = sock.recv(RECV_BYTES)
                if not data:
                    raise ConnectionError("connection closed by the sidecar")
                self._inbuf += data
            ack = json.loads(self._inbuf[:end])
            del self._inbuf[:end + 1]
        except (OSError, ValueError, RecursionError) as e:  # RecursionError: an answer nested past json's limit
            raise FeedbackConnectionLost(f"{type(e).__name__}: {e}", written=sent > 0) from None
        if type(ack) is not dict or type(ack.get("ok")) is not bool:
            raise FeedbackConnectionLost(f"unexpected answer {ack!r:.200}", written=True)
        return ack

    def _disconnect(self) -> None:
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _unreachable(self, why: Exception) -> None:
        if self._reachable and not self._stopping:
            self._reachable = False
            log.warning("feedback: sidecar %s unreachable (%s): retrying with backoff, %d samples queued",
                        self.socket_path, why, len(self._queue))

    def _log_once(self, kind: str, message: str, *args: Any) -> None:
        with self._lock:
            first = kind not in self._logged
            self._logged.add(kind)
        if first:
            log.warning(message, *args)


def begin_clients_again_in_child() -> None:
    for client in list(CLIENTS):
        client._begin_again_in_child()


os.register_at_fork(after_in_child=begin_clients_again_in_child)


def feedback_message(features: Any, true_score: Any, job_id: Any, n_features: int | None,
                     max_line: int | None) -> dict[str, Any]:
    """The request of one sample, its features copied; InvalidSample for what the sidecar would reject (see
    its parse_request). Encoding is left to the delivery thread: json.dumps of 80 floats is ~60 µs, which
    would keep a busy producer thread from ever letting the delivery thread run."""
    if isinstance(job_id, str):
        job_id = str.__str__(job_id)  # a subclass (numpy.str_) as the string json.dumps sends, whatever its __str__
    elif job_id is not None:
        raise InvalidSample(f"job_id: expected a string, got {json_type_name(job_id)}")
    if job_id is not None and job_id_too_long(job_id):
        raise InvalidSample(JOB_ID_TOO_LONG)
    if isinstance(features, numpy_types("ndarray")):
        features = features.tolist()  # Python numbers; a 2-D array becomes lists, refused below
    if not isinstance(features, (list, tuple)):  # subclasses too (a namedtuple): json.dumps sends an array
        count = "" if n_features is None else f"{n_features} "
        raise InvalidSample(f"features: expected a list of {count}numbers, got {json_type_name(features)}")
    if n_features is not None and len(features) != n_features:
        raise InvalidSample(f"features: expected {n_features} numbers, got {len(features)}")
    message: dict[str, Any] = {"features": feedback_numbers(features),
                               "true_score": feedback_number(true_score, "true_score")}
    if job_id is not None:
        message["job_id"] = job_id
    # A number takes at most 40 characters (a float's repr 24, an int up to 3.4e38 39 and a sign), a
    # job_id character at most 12 (\uXXXX\uXXXX for one past U+FFFF): only a line that might be too long is
    # encoded here to check.
    bound = 41 * (len(features) + 1) + 12 * len(job_id or "") + 64
    if max_line is not None and bound > max_line and len(feedback_line(message)) - 1 > max_line:
        raise InvalidSample(LINE_TOO_LONG.format(max_line))
    return message


def feedback_line(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def feedback_numbers(values: list[Any] | tuple[Any, ...]) -> list[int | float]:
    """The features as JSON numbers: the sidecar's parse_request's fast check, then a per-value pass only to convert
    numpy scalars or name the problem (the fast check alone is ~5x cheaper)."""
    if all((type(v) is float or type(v) is int) and -F32_BOUND <= v <= F32_BOUND for v in values):
        return list(values)  # a copy: the caller may reuse its list before the thread sends this one
    return [feedback_number(v, "features", i) for i, v in enumerate(values)]


def feedback_number(v: Any, field_name: str, index: int | None = None) -> int | float:
    """`v` as the JSON number the sidecar accepts; InvalidSample otherwise, with the sidecar's reason."""
    if isinstance(v, numpy_types("integer")):
        v = int(v)
    elif isinstance(v, numpy_types("floating")):
        v = float(v)  # .item() of a longdouble is a longdouble
    elif isinstance(v, float):  # a subclass, as the number json.dumps sends, whatever its methods say
        v = float.__float__(v)
    elif isinstance(v, int) and not isinstance(v, bool):  # an IntEnum, say; json.dumps sends a bool as true/false
        v = int.__int__(v)
    if type(v) is not float and type(v) is not int:  # bool is neither
        problem = f"expected a number, got {json_type_name(v)}"
    elif not (problem := float32_problem(v)):
        return v
    raise InvalidSample(f"{field_name}[{index}]: {problem}" if index is not None else f"{field_name}: {problem}")


def json_type_name(value: Any) -> str:
    """The type of `value` as the sidecar names it once json.dumps has sent it (a subclass as its JSON base: an
    IntEnum is a number, an OrderedDict an object); its Python name if JSON has none."""
    return next((JSON_TYPE_NAMES[t] for t in type(value).__mro__ if t in JSON_TYPE_NAMES), type(value).__name__)


def job_id_too_long(job_id: str) -> bool:
    """Whether a job_id is over JOB_ID_MAX_BYTES in UTF-8 as the sidecar stores it: JSON makes a surrogate pair one
    character (4 bytes) and keeps a lone surrogate (3), as here. A character takes at most 4 bytes, so only a
    long job_id is encoded to check."""
    if 4 * len(job_id) <= JOB_ID_MAX_BYTES:
        return False
    paired = job_id.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")
    return len(paired.encode("utf-8", "surrogatepass")) > JOB_ID_MAX_BYTES


def float32_problem(v: int | float) -> str | None:
    """Why a number cannot be a float32 model input, in the words of both ends of the socket; None if it can."""
    if type(v) is float and not math.isfinite(v):
        return "not a finite number (NaN, Infinity or an overflowing literal)"
    if not -F32_BOUND <= v <= F32_BOUND:  # an int too: it rounds to a float below the bound, then to F32_MAX
        return f"outside the float32 range (magnitude above {F32_BOUND!r}: infinite in float32)"
    return None


def numpy_types(*names: str) -> tuple[type, ...]:
    """numpy's classes of these names; none while numpy is not imported, since no numpy value can exist
    before. The checks above thus take numpy arrays and scalars without importing numpy themselves."""
    numpy = sys.modules.get("numpy")
    return tuple(getattr(numpy, name) for name in names) if numpy is not None else ()


def seconds_left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("no answer before the deadline")
    return left


# ---- clients of a running sidecar: `send` backfills from files, `status` asks how it is doing ----

# send streams files to a running sidecar over one connection with up to SEND_WINDOW lines, of up to
# SEND_WINDOW_BYTES, in flight: the server answers pipelined lines in order, and the ACKs it holds for us stay far
# below its OUTBUF_HIGH (1 MiB), past which it stops reading a connection. An ACK repeats its line's job_id, escaped to
# at most 6x its bytes (\u007f for a DEL), so long job_ids bound the window in bytes, not in lines.
SEND_WINDOW = 256
SEND_WINDOW_BYTES = 128 << 10
SEND_TIMEOUT_S = 60.0  # for each answer, by default: a sidecar pauses for milliseconds (a checkpoint, a snapshot)
FIRST_REJECTIONS = 10
ERROR_KINDS = 20  # distinct error texts counted apart; the rest share one count, so memory stays bounded
INPUT_SUFFIXES = (".csv", ".jsonl", ".ndjson", ".json")


@dataclass(frozen=True)
class CsvLayout:
    width: int  # cells per row, as in the header
    features: list[tuple[int, str]]  # (index, name) in request order
    score: tuple[int, str]
    job_id: int | None


class UnreadableInput(ValueError):
    """An input that cannot be read on from here; the message says where and why."""


def input_file(path: str) -> str:
    """argparse type: - (JSON lines on stdin) or a readable file with a known suffix."""
    if path == "-":
        if sys.stdin is None:  # fd 0 closed: its number may be a socket's by now
            raise argparse.ArgumentTypeError("-: standard input is closed")
        return path
    if not path.lower().endswith(INPUT_SUFFIXES):
        raise argparse.ArgumentTypeError(f"{path}: unknown file type (expected {', '.join(INPUT_SUFFIXES)} or -)")
    if os.path.isdir(path) or not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"{path}: no such file, or not a readable one")
    if path.lower().endswith(".csv") and not stat.S_ISREG(os.stat(path).st_mode):
        raise argparse.ArgumentTypeError(f"{path}: not a regular file: a CSV is read twice, its header before "
                                         f"anything is sent (a pipe would lose rows); save it, or send JSON lines")
    return path


def csv_layout(header: list[str], score_column: str, feature_columns: list[str] | None) -> CsvLayout:
    """Where a row holds the features (default: every column but the score and job_id), the score and the
    job id; ValueError naming a column the header lacks or names twice, or one the features would read twice or
    that holds the score or job id."""
    names = feature_columns or [n for n in header if n not in (score_column, "job_id")]
    if missing := [n for n in (score_column, *names) if n not in header]:
        raise ValueError(f"no column {', '.join(map(repr, missing))} in the header {header}")
    if repeated := sorted({n for n in (score_column, *names, "job_id") if header.count(n) > 1}):
        raise ValueError(f"column {', '.join(map(repr, repeated))} named more than once in the header {header}: "
                         f"which one holds the values is unknown")
    if misread := sorted({n for n in names if names.count(n) > 1 or n in (score_column, "job_id")}):
        raise ValueError(f"feature column {', '.join(map(repr, misread))} named twice, or as the score or job_id: "
                         f"a feature would repeat another, or be the label itself")
    return CsvLayout(len(header), [(header.index(n), n) for n in names], (header.index(score_column), score_column),
                     header.index("job_id") if "job_id" in header else None)


def csv_request(row: list[str], layout: CsvLayout) -> bytes:
    """The request line for one CSV row; ValueError saying which value is missing or not a number."""
    if len(row) != layout.width:
        raise ValueError(f"expected {layout.width} values as in the header, got {len(row)}")
    message: dict[str, Any] = {"features": [csv_number(row[i], name) for i, name in layout.features],
                               "true_score": csv_number(row[layout.score[0]], layout.score[1])}
    if layout.job_id is not None and row[layout.job_id]:  # an empty cell: a sample without a job id
        message["job_id"] = csv_text(row[layout.job_id], "job_id")
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"  # no longer than it must be: the line limit


def csv_text(cell: str, column: str) -> str:
    """The cell, if its bytes were UTF-8, as the sidecar requires of a line; csv_rows() kept those that were not."""
    try:
        cell.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{column}: not UTF-8: {cell.encode('utf-8', 'surrogateescape')[:40]!r}") from None
    return cell


# A decimal number, spaces around it allowed; NaN and inf pass, for the sidecar to reject with the reason it gives
# everyone. float() alone also took "3_5" as 35 and digits of other scripts ("٣"), which JSON has no number for.
CSV_NUMBER = re.compile(r"\s*[+-]?(([0-9]+\.?[0-9]*|\.[0-9]+)(e[+-]?[0-9]+)?|nan|inf|infinity)\s*",
                        re.ASCII | re.IGNORECASE)


def csv_number(text: str, column: str) -> float:
    if not CSV_NUMBER.fullmatch(text):
        raise ValueError(f"{column}: not a number: {text[:40]!r}")
    return float(text)


def csv_rows(lines: Iterator[bytes]) -> Any:
    """Rows of text: a byte-order mark is dropped from the first line only (spreadsheets write one), and bytes that
    are not UTF-8 are kept (as lone surrogates) for csv_text() to refuse, not replaced: two job ids would become
    one, and the sidecar would have refused them."""
    return csv.reader(line.decode("utf-8-sig" if number == 0 else "utf-8", "surrogateescape")
                      for number, line in enumerate(lines))


# In place of a request line: the input has no line ready (a pipe, a FIFO or a terminal whose writer has paused),
# and the next may be long in coming (`tail -f`): what was sent is settled meanwhile.
INPUT_WAITS = b""


def read_requests(paths: list[str], layouts: dict[str, CsvLayout], max_line: int, tally: Tally
                  ) -> Iterator[tuple[str, int, bytes | None, str | None]]:
    """(file, line number, request line or None, why it is not sent or None) for each non-blank line, and INPUT_WAITS
    as the line before a read that may wait."""
    for path in paths:
        name = "<stdin>" if path == "-" else path
        with open(sys.stdin.fileno() if path == "-" else path, "rb", closefd=path != "-") as f:
            if path not in layouts:  # JSON lines go as they are (a file's BOM aside): the sidecar checks them
                number = 0
                for line in json_lines(f, max_line, tally, may_wait=not stat.S_ISREG(os.fstat(f.fileno()).st_mode)):
                    if line == INPUT_WAITS:
                        yield name, number, INPUT_WAITS, None
                        continue
                    number += 1
                    if line is None:
                        yield name, number, None, LINE_TOO_LONG.format(max_line)
                    elif line.strip():  # the sidecar answers no blank line
                        yield name, number, line if line.endswith(b"\n") else line + b"\n", None
                continue
            rows = csv_rows(tally.counted(f))
            next(rows)  # the header, checked before anything was sent
            try:
                first = rows.line_num + 1  # of the next row: a quoted cell may take it over several lines
                for row in rows:
                    if row:  # [] is a blank line
                        yield name, rows.line_num, *csv_outcome(row, layouts[path], name, first, rows.line_num)
                    first = rows.line_num + 1
            except csv.Error as e:  # a stray carriage return, a cell past csv's size limit: where the next row
                # begins is unknown (inside a quoted cell, a line may be anything), so the file ends here
                raise UnreadableInput(f"{name}:{rows.line_num}: not a CSV row: {e}") from None


def csv_outcome(row: list[str], layout: CsvLayout, name: str, first: int, last: int) -> tuple[bytes | None, str | None]:
    """The row's request line, or why it is not sent. A row that took several lines (a quoted cell with newlines)
    and does not read is most likely a stray quote that took the rows after it: UnreadableInput, for the file
    ends there, not a rejection, which would say one row was refused where every row it took was not sent."""
    try:
        return csv_request(row, layout), None
    except ValueError as e:
        if first == last:
            return None, str(e)
        raise UnreadableInput(f"{name}:{first}: a quoted cell runs on to line {last}, and the row does not read "
                              f"({e}): a stray double quote?") from None


def json_lines(f: io.BufferedReader, limit: int, tally: Tally, may_wait: bool = False) -> Iterator[bytes | None]:
    """f's lines, a byte-order mark that begins it dropped (as some editors begin a UTF-8 file); None for one of more
    than `limit` bytes before its newline, which the sidecar would refuse, and which is read on in pieces, never held
    whole (a JSON array on one line, say); a blank one, however long, as a blank line. An f that `may_wait` (not a
    regular file) gives INPUT_WAITS before a read when nothing is ready to read (or only what f has buffered)."""
    bom = len(codecs.BOM_UTF8)
    limit = min(limit, sys.maxsize - 1 - bom)  # one past what a read can ask for (an operator's "no limit"): none
    while True:
        if may_wait and not select.select([f], [], [], 0)[0]:
            yield INPUT_WAITS
        if not (line := f.readline(limit + 1 + bom)):
            return
        tally.bytes_read += len(line)
        if bom:
            line, bom = line.removeprefix(codecs.BOM_UTF8), 0
        if len(line) - line.endswith(b"\n") <= limit:
            yield line or b"\n"  # a byte-order mark alone is a blank line, not INPUT_WAITS
            continue
        blank, piece = not line.strip(), line
        while not piece.endswith(b"\n") and (piece := f.readline(RECV_BYTES)):
            tally.bytes_read += len(piece)
            blank = blank and not piece.strip()
        yield b"\n" if blank else None


class Tally:
    """Counts, the first rejections and the progress display; its memory does not grow with the input."""

    def __init__(self, total_bytes: int | None, tty: bool):
        self.total_bytes, self.tty = total_bytes, tty
        self.bytes_read = self.sent = self.accepted = self.rejected = self.local = 0
        self.first: list[str] = []
        self.errors: collections.Counter[str] = collections.Counter()
        self.done_to: str | None = None  # the last line settled, in input order: where to resume
        self.started = self.shown = time.monotonic()

    def counted(self, lines: Iterator[bytes]) -> Iterator[bytes]:
        for line in lines:
            self.bytes_read += len(line)
            yield line

    def settle(self, name: str, number: int, error: str | None) -> None:
        if error is None:
            self.accepted += 1
        else:
            self.rejected += 1
            if len(self.first) < FIRST_REJECTIONS:
                self.first.append(f"{name}:{number}: {error}")
            self.errors[error if error in self.errors or len(self.errors) < ERROR_KINDS else "(other errors)"] += 1
        self.done_to = f"{name}:{number}"
        now = time.monotonic()
        if now - self.shown >= (0.1 if self.tty else 5.0):  # a redrawn line on a terminal, else a log line
            self.shown = now
            line = self.progress(now - self.started)
            sys.stderr.write(f"\r{line}\x1b[K" if self.tty else f"vmafx-sidecar send: {line}\n")
            sys.stderr.flush()

    def progress(self, elapsed: float) -> str:
        done = self.accepted + self.rejected
        parts = [f"{done} lines", f"{done / elapsed:.0f} lines/s"]
        if self.total_bytes and self.bytes_read < self.total_bytes:  # not past a size measured at the start
            eta = (self.total_bytes - self.bytes_read) * elapsed / max(1, self.bytes_read)
            parts += [f"{self.bytes_read / self.total_bytes:.0%} of {self.total_bytes / 1e6:.1f} MB",
                      f"ETA {datetime.timedelta(seconds=round(eta))}"]
        return "  ".join([*parts, f"accepted {self.accepted}", f"rejected {self.rejected}"])

    def summary(self) -> None:
        if self.tty and self.shown > self.started:
            sys.stderr.write("\r\x1b[K")  # the progress line gives way to the summary
        elapsed = time.monotonic() - self.started
        rejected = f"{self.rejected} ({self.local} refused before sending)" if self.local else self.rejected
        sent = max(self.sent, self.accepted + self.rejected - self.local)  # answered: sent by a sendall() that failed
        print_rows([("sent", sent), ("accepted", self.accepted), ("rejected", rejected), ("elapsed",
                    f"{elapsed:.1f} s"), ("rate", f"{(self.accepted + self.rejected) / elapsed:.0f} lines/s")])
        if self.first:
            print("first rejections:", *(f"  {line}" for line in self.first), sep="\n")
            print("rejections by error:", *(f"  {n:>9}  {e}" for e, n in self.errors.most_common()), sep="\n")


def send_lines(sock: socket.socket, reader: io.BufferedReader,
               requests: Iterator[tuple[str, int, bytes | None, str | None]], tally: Tally) -> None:
    """Send half a window at a time and read ACKs down to the other half, so the sidecar always has lines
    queued; when the input waits (INPUT_WAITS: `tail -f`), every line read so far, and their ACKs, so that a
    rejection or a sidecar gone is told then, not a window of lines later. Lines rejected here wait in the queue
    too: everything is settled in input order. An input that cannot be read on (OSError, UnreadableInput) ends
    the sending, once what was queued before it is settled."""
    queue: collections.deque[tuple[str, int, str | None, int]] = collections.deque()
    chunk: list[bytes] = []
    in_flight = 0  # bytes of the queued lines
    unreadable = None
    while True:
        try:
            name, number, line, error = next(requests)
        except StopIteration:
            break
        except (OSError, UnreadableInput) as e:
            unreadable = e
            break
        if line == INPUT_WAITS:
            transmit(sock, chunk, tally)
            while queue:
                in_flight -= settle_next(reader, queue, tally)
            continue
        size = len(line) if line is not None else 0
        queue.append((name, number, error, size))
        in_flight += size
        if line is not None:
            chunk.append(line)
        if len(queue) >= SEND_WINDOW or in_flight >= SEND_WINDOW_BYTES:
            transmit(sock, chunk, tally)
            while len(queue) > SEND_WINDOW // 2 or in_flight > SEND_WINDOW_BYTES // 2:
                in_flight -= settle_next(reader, queue, tally)
    transmit(sock, chunk, tally)
    while queue:
        settle_next(reader, queue, tally)
    if unreadable:
        raise unreadable


def transmit(sock: socket.socket, chunk: list[bytes], tally: Tally) -> None:
    try:
        sock.sendall(b"".join(chunk))
        tally.sent += len(chunk)
    except OSError:  # the sidecar went away: the ACKs it did send are still read, then reading fails
        pass
    chunk.clear()


def settle_next(reader: io.BufferedReader, queue: collections.deque[tuple[str, int, str | None, int]],
                tally: Tally) -> int:
    """Settle the oldest queued line; its size."""
    name, number, error, size = queue.popleft()
    if error is None:
        try:
            answer = reader.readline(ANSWER_MAX_BYTES + 1)
        except TimeoutError:
            raise
        except OSError as e:
            raise ConnectionError(e.strerror or str(e)) from None
        if not answer.endswith(b"\n"):
            raise ConnectionError(NOT_AN_ANSWER if len(answer) > ANSWER_MAX_BYTES
                                  else "the sidecar closed the connection")
        try:
            ack = json.loads(answer)
        except (ValueError, RecursionError):
            ack = None
        if type(ack) is not dict or type(ack.get("ok")) is not bool:  # not the sidecar's: no line is settled by it
            raise ConnectionError(f"unexpected answer {answer[:200]!r}")
        error = None if ack["ok"] else ack.get("error", "rejected")
        if error is None and "op" in ack:  # answered, but the line was a control message, not a sample
            error = f"not a sample: a control message, answered with op {ack['op']!r}"
    else:
        tally.local += 1
    tally.settle(name, number, error)
    return size


def send_files(paths: list[str], socket_path: str, score_column: str, feature_columns: list[str] | None,
               timeout_s: float = SEND_TIMEOUT_S) -> int:
    """Stream every line of `paths` to the sidecar; 0 when all were accepted, 1 on any rejection, when the
    connection is lost or an answer has not come within `timeout_s`, or when an input cannot be read on."""
    layouts = {}
    for path in (p for p in paths if p.lower().endswith(".csv")):  # every header is checked before sending
        try:
            with open(path, "rb") as f:
                layouts[path] = csv_layout(next(csv_rows(f), []), score_column, feature_columns)
        except (ValueError, csv.Error) as e:
            print(f"vmafx-sidecar send: {path}: {e}", file=sys.stderr)
            return 1
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)  # a stopped or stalled sidecar ends the command, as a lost connection does
        try:
            connect_before(sock, socket_path, time.monotonic() + timeout_s)
        except OSError as e:
            print(f"vmafx-sidecar send: {socket_path}: {e.strerror or e}", file=sys.stderr)
            return 1
        tally = Tally(total_bytes(paths), sys.stderr.isatty())
        stopped, full, hint = None, False, None
        try:
            with sock.makefile("rb") as reader:
                max_line, full = sidecar_limits(sock, reader)
                send_lines(sock, reader, read_requests(paths, layouts, max_line, tally), tally)
        except ConnectionError as e:
            stopped = f"connection to {socket_path} lost ({e})"
            # At its limit when it answered, closed at the first sample, and still there: the probes' reserve.
            if full and not tally.accepted + tally.rejected - tally.local and answers_a_ping(socket_path):
                hint = ("the sidecar was serving as many connections as VMAFX_SIDECAR_MAX_CONNECTIONS allows, and "
                        "answered this one from the reserve it keeps for probes: try again once one closes")
        except TimeoutError:
            stopped = f"no answer from {socket_path} within {timeout_s:g} s"
        except OSError as e:  # reading the input: send_lines() raises it once the lines before are settled
            stopped = f"cannot read {e.filename or 'the input'} ({e.strerror or e})"
        except UnreadableInput as e:
            stopped = f"cannot read on: {e}"
        except KeyboardInterrupt:
            stopped = "interrupted"
    tally.summary()
    if stopped:  # the sidecar journals each sample before its ACK: what follows done_to is all that is left
        print(f"vmafx-sidecar send: {stopped} after {tally.accepted + tally.rejected - tally.local} lines were "
              f"acknowledged" + (f"; the input was done up to {tally.done_to}" if tally.done_to else ""),
              file=sys.stderr)
    if hint:
        print(f"vmafx-sidecar send: {hint}", file=sys.stderr)
    return 1 if stopped or tally.rejected else 0


def answers_a_ping(path: str) -> bool:
    try:
        return ask(path, b'{"op":"ping"}\n', 2.0) == PONG
    except OSError:
        return False


def sidecar_limits(sock: socket.socket, reader: io.BufferedReader) -> tuple[int, bool]:
    """The sidecar's VMAFX_SIDECAR_MAX_LINE_BYTES, from its status (a longer line is refused unread and unsent), and
    whether it served as many connections as it may (this one among them, or not: then it answered from the reserve
    it keeps for probes, and closes the connection at the first sample)."""
    status = None
    try:
        sock.sendall(FEEDBACK_STATUS_REQUEST)
        if not (answer := reader.readline(ANSWER_MAX_BYTES + 1)):
            raise ConnectionError("closed unanswered: the sidecar is stopping, or serves as many connections as "
                                  "VMAFX_SIDECAR_MAX_CONNECTIONS allows and as many probes as it keeps places for")
        status = json.loads(answer)
        full = status.get("connections", 0) >= status["config"].get("max_connections", math.inf)
        return int(status["config"]["max_line_bytes"]), full
    except TimeoutError:
        raise
    except OSError as e:
        raise ConnectionError(e.strerror or e) from None
    except (ValueError, RecursionError, KeyError, TypeError, AttributeError, OverflowError):  # Overflow: 1e400
        refusal = status.get("error") if type(status) is dict and status.get("ok") is False else None
        raise ConnectionError(f"the sidecar refused a status request: {refusal}" if refusal
                              else "its answer to a status request was not a status") from None


def total_bytes(paths: list[str]) -> int | None:
    """The inputs' size, for the progress display; None where it cannot be known (stdin, a file gone since)."""
    try:
        return None if "-" in paths else sum(map(os.path.getsize, paths))
    except OSError:
        return None


def show_status(socket_path: str, timeout_s: float, as_json: bool) -> int:
    """The status op as aligned `key  value` lines, nested objects as dotted keys; or its answer as is."""
    answer = b""
    try:
        answer = ask(socket_path, b'{"op": "status"}\n', timeout_s)
        status = json.loads(answer)
    except OSError as e:
        print(f"vmafx-sidecar status: {socket_path}: {e.strerror or e}", file=sys.stderr)
        return 1
    except (ValueError, RecursionError):
        status = None
    if type(status) is dict and status.get("ok") is False and type(status.get("error")) is str:
        print(f"vmafx-sidecar status: {socket_path}: refused: {status['error']}", file=sys.stderr)
        return 1
    if type(status) is not dict or status.get("ok") is not True or status.get("op") != "status":
        print(f"vmafx-sidecar status: {socket_path}: unexpected answer {answer[:200]!r}", file=sys.stderr)
        return 1
    if as_json:
        print(answer.decode().rstrip("\n"))
    else:
        print_rows([row for row in status_rows(status) if row[0] not in ("ok", "op")])
    return 0


def status_rows(status: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    rows = []
    for key, value in status.items():
        if isinstance(value, dict) and value:
            rows += status_rows(value, f"{prefix}{key}.")
        else:  # null as -, lists joined, an empty string as ""
            rows.append((prefix + key, "-" if value is None else ", ".join(map(str, value)) if isinstance(value, list)
                         else value if isinstance(value, str) and value else json.dumps(value)))
    return rows


def print_rows(rows: list[tuple[str, Any]]) -> None:
    width = max((len(key) for key, _ in rows), default=0)
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")
