"""What running between request lines costs the training step, in process.

Trainer.step takes about 50 µs in a tight loop and 75-82 µs in the server's loop (BENCHMARKS.md, issue 19).
This times one trainer's steps by the thread's CPU clock, with what separates two steps in the server (the
16 request lines that bring a step's 16 new samples) put back one part at a time:

  alone          nothing between two steps
  neighbour      nothing, while another process parses JSON flat out on the other CPU
  self           16 lines parsed, each after a round trip through a socket pair inside this process
  self, idle     the same, each round trip after IDLE_S of sleep: the CPU idles, as a server's does while
                 it waits for its clients' next lines
  partner, same  16 round trips to a partner process that answers each ACK with the next line, as a client
                 does, on this process's CPU
  partner, other the same, the partner on the other CPU

Each line's parse is timed too, where there are lines: the floor does that work, and pays whatever the
exchange costs it. The configurations alternate within each round, on CPU 0 (the partner and the neighbour
on CPU 1), so that this machine's drift reaches them all alike:

    .venv/bin/python benchmarks/bench_step_between.py [--rounds 4] [--steps 1500]

Standard library and numpy only; it needs two CPUs.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

from bench_ingest import machine, make_lines, markdown_table, pend_step, steady_trainer, vs

LINES_PER_STEP = 16  # a step's new samples at the defaults: each came in its own line
ACK = b'{"ok": true, "step": 1, "trained": false}\n'  # what the partner reads before it sends its next line
WARMUP_STEPS = 300
IDLE_S = 30e-6  # about a line's round trip at 4 connections
MODES = ("alone", "neighbour", "self", "self, idle", "partner, same", "partner, other")


def partner(sock: socket.socket, lines: list[bytes]) -> None:
    """A client's side: read an ACK, send the next line; until the socket closes."""
    for line in itertools.cycle(lines):
        data = sock.recv(4096)
        if not data:
            return
        json.loads(data)
        sock.sendall(line)


def neighbour(lines: list[bytes]) -> None:
    while True:
        json.loads(lines[0])


def forked(cpu: int, work: Callable[[], None]) -> int:
    pid = os.fork()
    if pid == 0:
        os.sched_setaffinity(0, {cpu})
        try:
            work()
        finally:
            os._exit(0)
    return pid


def round_trip(ours: socket.socket, theirs: socket.socket | None, line: bytes) -> bytes:
    """Send an ACK and read the next line: from a partner process, or through `theirs` when it is ours too."""
    ours.sendall(ACK)
    if theirs is not None:
        theirs.recv(4096)
        theirs.sendall(line)
    return ours.recv(4096)


def median_us(mode: str, steps: int, lines: list[bytes]) -> tuple[float, float | None]:
    """The median step and the median line's parse, in µs of this thread's CPU, with `mode`'s work between
    steps (no parse timed when it has no lines)."""
    os.sched_setaffinity(0, {0})
    ours, theirs = socket.socketpair()
    child = None
    if mode == "neighbour":
        child = forked(1, lambda: neighbour(lines))
    elif mode.startswith("partner"):
        child = forked(0 if mode.endswith("same") else 1, lambda: (ours.close(), partner(theirs, lines)))
        theirs.close()
        theirs = None
    exchanging, idling = mode.startswith(("self", "partner")), mode == "self, idle"
    try:
        with tempfile.TemporaryDirectory(prefix="vmafx-bench-between-") as tmp:
            trainer, x, y = steady_trainer(tmp)
            steps_ns, parses_ns, clock = [], [], time.thread_time_ns
            for i in range(WARMUP_STEPS + steps):
                for k in range(LINES_PER_STEP if exchanging else 0):
                    if idling:
                        time.sleep(IDLE_S)
                    line = round_trip(ours, theirs, lines[(i + k) % len(lines)])
                    started = clock()
                    vs.parse_request(line.rstrip(b"\n"), trainer.config.n_features)
                    parses_ns.append(clock() - started)
                pend_step(trainer, x, y, i)
                started = clock()
                trainer.step()
                steps_ns.append(clock() - started)
    finally:
        ours.close()
        if theirs is not None:
            theirs.close()
        if child is not None:
            if mode == "neighbour":
                os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
    parse = statistics.median(parses_ns[WARMUP_STEPS * LINES_PER_STEP:]) / 1e3 if parses_ns else None
    return statistics.median(steps_ns[WARMUP_STEPS:]) / 1e3, parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1500, help="timed steps per configuration and round")
    args = parser.parse_args(argv)
    if not {0, 1} <= os.sched_getaffinity(0):
        print("needs CPUs 0 and 1", file=sys.stderr)
        return 2
    lines, ran_on, rows = make_lines(64, 0, 7, True), machine(), []
    for r in range(1, args.rounds + 1):
        figures = [median_us(mode, args.steps, lines) for mode in MODES]
        rows.append([str(r), *(f"{step:.1f}" for step, _ in figures),
                     *(f"{parse:.1f}" for _, parse in figures if parse is not None)])
        print(f"round {r}: " + ", ".join(rows[-1][1:]), file=sys.stderr)
    print(ran_on)
    print()
    markdown_table(["round", *(f"step, {m}" for m in MODES), *(f"a line's parse, {m}" for m in MODES[2:])], rows)
    print("\nMedians in µs of the thread's CPU clock.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
