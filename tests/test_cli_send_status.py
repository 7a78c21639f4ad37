"""`vmafx-sidecar send` (backfill from CSV and JSON-lines files) and `vmafx-sidecar status`, run as a user
runs them: a subprocess against a real sidecar (the progress display against a paced stand-in)."""
from __future__ import annotations

import codecs
import hashlib
import io
import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import vmafx_feedback as vf
import vmafx_sidecar as vs
from conftest import ROOT, Client, NoState, make_trainer

N = 4  # features: small, so that large files stay cheap
SERVER = {"VMAFX_SIDECAR_N_FEATURES": str(N), "VMAFX_SIDECAR_JOURNAL_FSYNC": "no"}
VALID = b'{"features": [0.1, 0.2, 0.3, 0.4], "true_score": 50}\n'
SHORT = b'{"features": [0.1, 0.2, 0.3], "true_score": 50}\n'  # one feature short: the sidecar rejects it


def cli_env(**extra: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **extra}


def cli(*args: str, stdin: bytes | None = None, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmafx_sidecar", *args], input=stdin, capture_output=True,
                          env=cli_env(**env), cwd=ROOT, timeout=120)


def send(sidecar, *args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    done = cli("send", "--socket", sidecar.socket, *args, stdin=stdin)
    stderr = done.stderr.decode()
    assert "\r" not in stderr and "Traceback" not in stderr, stderr  # not a terminal: plain lines only
    return done.returncode, done.stdout.decode(), stderr


def status(sidecar) -> dict:
    client = Client(sidecar.socket)
    try:
        return client.request({"op": "status"})
    finally:
        client.close()


def summary(stdout: str) -> dict[str, str]:
    return dict(re.findall(r"^(sent|accepted|rejected)\s+(.+)$", stdout, re.M))


def rejections(stdout: str) -> list[str]:
    block = stdout.split("first rejections:\n")[1].split("rejections by error:")[0]
    return [line.strip() for line in block.splitlines()]


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def held_out(job_id: str, fraction: float) -> bool:
    """The sidecar's own rule (Trainer.is_held_out) for a sample with a job id."""
    digest = hashlib.blake2b(job_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


# ---- CSV rows -> request lines, in process ----

def test_csv_layout_defaults_to_every_column_but_score_and_job_id_in_header_order():
    layout = vf.csv_layout(["b", "job_id", "a", "true_score", "c"], "true_score", None)
    message = json.loads(vf.csv_request(["1", "enc-7", "2", "80.5", "3"], layout))
    assert message == {"features": [1.0, 2.0, 3.0], "true_score": 80.5, "job_id": "enc-7"}


def test_a_csv_rows_request_line_is_compact_json():
    """With json.dumps' spaced separators a row's line was longer than the same sample written by hand: a row within
    VMAFX_SIDECAR_MAX_LINE_BYTES as JSON was refused as too long."""
    layout = vf.csv_layout(["a", "b", "true_score", "job_id"], "true_score", None)
    line = b'{"features":[1.0,2.5],"true_score":80.0,"job_id":"enc-7"}\n'
    assert vf.csv_request(["1", "2.5", "80", "enc-7"], layout) == line


def test_csv_layout_takes_the_named_feature_columns_in_the_order_given():
    layout = vf.csv_layout(["a", "b", "c", "note", "vmaf"], "vmaf", ["c", "a"])
    message = json.loads(vf.csv_request(["1", "2", "3", "not a number", "90"], layout))
    assert message == {"features": [3.0, 1.0], "true_score": 90.0}


def test_csv_rows_that_cannot_be_sent_say_why():
    layout = vf.csv_layout(["job_id", "f0", "true_score"], "true_score", None)
    assert "job_id" not in json.loads(vf.csv_request(["", "1", "2"], layout))  # an empty cell: no job id
    for row, error in ((["j", "x1", "2"], "f0: not a number: 'x1'"), (["j", "1", ""], "true_score: not a number: ''"),
                       (["j", "1"], "expected 3 values as in the header, got 2")):
        with pytest.raises(ValueError, match=re.escape(error)):
            vf.csv_request(row, layout)
    with pytest.raises(ValueError, match="no column 'score', 'f9'"):
        vf.csv_layout(["f0", "true_score"], "score", ["f9"])


@pytest.mark.parametrize("cell", ["3_5", "1_000.0", "\u0663", "\uff11\uff12", "\u00a01", "0x10", "1e", ".", "e5",
                                  "1.2.3", "nanx"])
def test_a_csv_cell_is_a_number_only_as_json_writes_one(cell):
    """float() alone took "3_5" as 35 and digits of other scripts, which the sidecar would refuse as JSON."""
    layout = vf.csv_layout(["f0", "true_score"], "true_score", None)
    with pytest.raises(ValueError, match=re.escape(f"f0: not a number: {cell!r}")):
        vf.csv_request([cell, "50"], layout)


@pytest.mark.parametrize("cell, value", [("1", 1.0), (" 2.5 ", 2.5), ("-3e5", -3e5), ("+.5", 0.5), ("5.", 5.0),
                                         ("1E-3", 1e-3)])
def test_a_csv_cell_may_have_spaces_a_sign_and_an_exponent(cell, value):
    layout = vf.csv_layout(["f0", "true_score"], "true_score", None)
    assert json.loads(vf.csv_request([cell, "50"], layout))["features"] == [value]


@pytest.mark.parametrize("header, features", [(["f0", "f1", "f0", "true_score"], None),
                                              (["f0", "true_score", "true_score"], None),
                                              (["job_id", "f0", "job_id", "true_score"], None),
                                              (["f0", "f1", "f1", "true_score"], ["f1"])])
def test_a_column_named_twice_is_refused_before_anything_is_sent(header, features):
    """Which of the two holds the values is unknown: the first one's had been sent for both, and trained on."""
    repeated = next(n for n in header if header.count(n) > 1)
    with pytest.raises(ValueError, match=f"column '{repeated}' named more than once in the header"):
        vf.csv_layout(header, "true_score", features)
    vf.csv_layout(["f0", "note", "note", "true_score"], "true_score", ["f0"])  # a column not read may repeat


@pytest.mark.parametrize("features", [["f0", "f0"], ["f0", "true_score"], ["job_id", "f0"]],
                         ids=["a feature twice", "the score", "the job id"])
def test_feature_columns_that_repeat_or_hold_the_label_are_refused_before_anything_is_sent(features):
    """--feature-columns f0,f0 filled two inputs with one value; f0,true_score trained on the label itself."""
    with pytest.raises(ValueError, match="named twice, or as the score or job_id"):
        vf.csv_layout(["job_id", "f0", "f1", "true_score"], "true_score", features)


def test_csv_text_is_utf8_as_written_a_bom_dropped_from_the_first_line_only():
    """Bytes that are not UTF-8 were replaced (two job ids became one, where the sidecar refuses such a line), and a
    BOM was dropped from every line (a job id "\ufeffx" became "x")."""
    rows = list(vf.csv_rows([b"\xef\xbb\xbfjob_id,f0,true_score\n", b"\xef\xbb\xbfx,1,2\n", b"enc-\xff\xfe1,1,2\n"]))
    assert rows[:2] == [["job_id", "f0", "true_score"], ["\ufeffx", "1", "2"]]
    layout = vf.csv_layout(rows[0], "true_score", None)
    assert json.loads(vf.csv_request(rows[1], layout))["job_id"] == "\ufeffx"
    with pytest.raises(ValueError, match=re.escape("job_id: not UTF-8: b'enc-\\xff\\xfe1'")):
        vf.csv_request(rows[2], layout)


# ---- send ----

def test_send_csv_backfills_every_row_and_passes_job_ids_through(sidecar_factory, tmp_path):
    sidecar = sidecar_factory(**SERVER, VMAFX_SIDECAR_HOLDOUT_FRACTION="0.5")
    # Job ids the sidecar holds out, by its hash: all 12 rows are held out only if the ids reach it
    # (without them, every second row would be).
    ids = [j for j in (f"enc-{i}" for i in range(100)) if held_out(j, 0.5)][:12]
    rows = [f"{j},{i},0.5,0.25,1e-3,{60 + i}" for i, j in enumerate(ids)]
    path = write_csv(tmp_path / "jobs.csv", "job_id,f0,f1,f2,f3,true_score", rows)

    rc, stdout, stderr = send(sidecar, str(path))

    assert rc == 0, stdout + stderr
    assert summary(stdout) == {"sent": "12", "accepted": "12", "rejected": "0"}
    assert re.search(r"^elapsed\s+\d+\.\d s$", stdout, re.M) and re.search(r"^rate\s+\d+ lines/s$", stdout, re.M)
    assert "first rejections" not in stdout
    answer = status(sidecar)
    assert (answer["samples_accepted"], answer["samples_held_out"], answer["samples_rejected"]) == (12, 12, 0)


def test_send_csv_feature_and_score_columns(sidecar_factory, tmp_path):
    sidecar = sidecar_factory(**SERVER)
    # Six numeric columns besides the score: only a four-column selection makes a valid sample; the NaN
    # in f3 shows where f3 went in the request (the sidecar names the feature's index).
    rows = ["1,2,3,4,5,6,77", "1,2,3,nan,5,6,78"]
    path = write_csv(tmp_path / "vmaf.csv", "f0,f1,f2,f3,extra1,extra2,vmaf", rows)

    rc, stdout, stderr = send(sidecar, "--score-column", "vmaf", "--feature-columns", "f3,f1,f0,f2", str(path))
    assert rc == 1
    assert summary(stdout) == {"sent": "2", "accepted": "1", "rejected": "1"}
    assert rejections(stdout) == [f"{path}:3: features[0]: not a finite number (NaN, Infinity or an overflowing "
                                  "literal)"]

    rc, stdout, _ = send(sidecar, "--score-column", "vmaf", str(path))  # all six columns: two too many
    assert rc == 1 and summary(stdout)["rejected"] == "2"
    assert rejections(stdout) == [f"{path}:2: features: expected 4 numbers, got 6",
                                  f"{path}:3: features: expected 4 numbers, got 6"]

    rc, stdout, stderr = send(sidecar, str(path))  # no true_score column: nothing is sent
    assert rc == 1 and stdout == ""
    assert stderr.strip() == f"vmafx-sidecar send: {path}: no column 'true_score' in the header " \
                             "['f0', 'f1', 'f2', 'f3', 'extra1', 'extra2', 'vmaf']"
    assert status(sidecar)["samples_accepted"] == 1


def test_send_jsonl_files_and_stdin_skip_blank_lines(sidecar_factory, tmp_path):
    sidecar = sidecar_factory(**SERVER)
    first = tmp_path / "a.jsonl"
    first.write_bytes(b"\xef\xbb\xbf" + VALID + b"\n  \n" + VALID + VALID.rstrip(b"\n"))  # a BOM; blank lines; no end
    second = tmp_path / "b.ndjson"
    second.write_bytes(VALID * 2)

    rc, stdout, stderr = send(sidecar, str(first), "-", str(second), stdin=b"\n" + VALID * 4)

    assert rc == 0, stdout + stderr
    assert summary(stdout) == {"sent": "9", "accepted": "9", "rejected": "0"}
    assert status(sidecar)["samples_accepted"] == 9


def test_send_keeps_the_acks_it_waits_for_within_what_the_sidecar_holds_for_a_client(sidecar_factory, tmp_path):
    """Each ACK repeats its job_id: 256 lines in flight with job_ids of 8 000 bytes made 2 MB of ACKs the sidecar
    held for send, past its 1 MiB limit, and it dropped the connection after 28 lines (the summary said sent 0)."""
    sidecar = sidecar_factory(**SERVER)
    path = tmp_path / "long-ids.jsonl"
    lines = [b'{"job_id": "%s-%d", "features": [0.1, 0.2, 0.3, 0.4], "true_score": 50}\n' % (b"j" * 30_000, i)
             for i in range(300)]
    path.write_bytes(b"".join(lines))

    rc, stdout, stderr = send(sidecar, str(path))

    assert rc == 0, stdout + stderr
    assert summary(stdout) == {"sent": "300", "accepted": "300", "rejected": "0"}
    assert status(sidecar)["connections_dropped"] == 0


def test_control_lines_are_not_counted_as_accepted_samples(sidecar_factory):
    sidecar = sidecar_factory(**SERVER)
    rc, stdout, stderr = send(sidecar, "-", stdin=VALID + b'{"op": "ping"}\n' + VALID + b'{"op": "status"}\n')
    assert rc == 1, stdout + stderr
    assert summary(stdout) == {"sent": "4", "accepted": "2", "rejected": "2"}
    assert "<stdin>:2: not a sample: a control message, answered with op 'pong'" in stdout, stdout
    assert "<stdin>:4: not a sample: a control message, answered with op 'status'" in stdout, stdout
    assert status(sidecar)["samples_accepted"] == 2


def test_rejected_lines_are_listed_with_file_and_line_and_exit_1(sidecar_factory, tmp_path):
    sidecar = sidecar_factory(**SERVER)
    jsonl = tmp_path / "samples.jsonl"
    jsonl.write_bytes(VALID + b"\n" + b'{"features": [NaN, 0.2, 0.3, 0.4], "true_score": 50}\n' + VALID + SHORT)
    table = write_csv(tmp_path / "table.csv", "f0,f1,f2,f3,true_score", ["1,2,3,4,50", "1,2,x,4,50", "", "1,2,3,4,5"])

    rc, stdout, _ = send(sidecar, str(jsonl), str(table))

    assert rc == 1
    assert summary(stdout) == {"sent": "6", "accepted": "4", "rejected": "3 (1 refused before sending)"}
    assert rejections(stdout) == [
        f"{jsonl}:3: features[0]: not a finite number (NaN, Infinity or an overflowing literal)",
        f"{jsonl}:5: features: expected 4 numbers, got 3",
        f"{table}:3: f2: not a number: 'x'",  # the header is line 1
    ]
    answer = status(sidecar)
    assert (answer["samples_accepted"], answer["samples_rejected"]) == (4, 2)


def test_names_that_are_not_utf8_are_printed_escaped_where_stdout_is_strict(sidecar_factory, tmp_path):
    """A file name, a CSV column or a checkpoint directory in Latin-1, under a UTF-8 locale (whose stdout is
    strict): `send` stopped with a traceback before its resume line, and `status` in the middle of its table."""
    directory = os.fsdecode(bytes(tmp_path) + b"/ck-caf\xe9")
    sidecar = sidecar_factory(**SERVER, VMAFX_SIDECAR_CHECKPOINT_DIR=directory)
    jsonl = os.fsdecode(bytes(tmp_path) + b"/jobs-caf\xe9.jsonl")
    Path(jsonl).write_bytes(VALID + SHORT)
    table = tmp_path / "table.csv"
    table.write_bytes(b"f0,f1,f2,qualit\xe9,true_score\n1,2,3,,50\n")
    done = cli("send", "--socket", sidecar.socket, jsonl, str(table), PYTHONIOENCODING="utf-8:strict")
    stdout, stderr = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 1 and "Traceback" not in stderr, stderr
    assert summary(stdout) == {"sent": "2", "accepted": "1", "rejected": "2 (1 refused before sending)"}
    assert "jobs-caf\\udce9.jsonl:2: features: expected 4 numbers, got 3" in stdout
    assert "qualit\\udce9: not a number: ''" in stdout
    done = cli("status", "--socket", sidecar.socket, PYTHONIOENCODING="utf-8:strict")
    assert done.returncode == 0 and "Traceback" not in done.stderr.decode(), done.stderr.decode()
    assert "ck-caf\\udce9" in done.stdout.decode()


def test_send_memory_does_not_grow_with_the_input(sidecar_factory, tmp_path):
    sidecar = sidecar_factory(**SERVER)
    # VmHWM of the process itself: getrusage's peak would include the pre-exec fork of this test process.
    measured = ("import re, sys, vmafx_sidecar\nrc = vmafx_sidecar.main(sys.argv[1:])\n"
                "print(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read())[1], file=sys.stderr)\n"
                "sys.exit(rc)")
    peaks = {}
    for lines in (5_000, 50_000):
        path = tmp_path / f"{lines}.jsonl"
        path.write_bytes((VALID + SHORT) * (lines // 2))  # half of them rejected: the list of reasons is bounded
        done = subprocess.run([sys.executable, "-c", measured, "send", "--socket", sidecar.socket, str(path)],
                              capture_output=True, env=cli_env(), cwd=ROOT, timeout=120)
        stdout = done.stdout.decode()
        assert done.returncode == 1, done.stderr
        assert summary(stdout) == {"sent": str(lines), "accepted": str(lines // 2), "rejected": str(lines // 2)}
        assert len(rejections(stdout)) == 10
        assert re.search(rf"^ +{lines // 2}  features: expected 4 numbers, got 3$", stdout, re.M)
        peaks[lines] = int(done.stderr.splitlines()[-1])  # kB
    # Keeping so much as one small int per line would add 1.6 MB.
    assert peaks[50_000] - peaks[5_000] < 1024, peaks


def paced_sidecar(path: str, pause_s: float) -> threading.Thread:
    """A stand-in for the sidecar on `path` that answers send's status request, then accepts every sample of one
    connection, each `pause_s` or more after the last: a send of n lines then takes n × pause_s at least, however
    fast the machine."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
        with conn, conn.makefile("rb") as lines:
            assert json.loads(next(lines)) == {"op": "status"}
            conn.sendall(b'{"ok": true, "op": "status", "config": {"max_line_bytes": 1048576}}\n')
            for line in filter(bytes.strip, lines):
                time.sleep(pause_s)
                conn.sendall(b'{"ok": true, "step": 0, "trained": false}\n')

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_send_on_a_terminal_draws_one_progress_line(tmp_path):
    socket_path = str(tmp_path / "paced.sock")
    server = paced_sidecar(socket_path, 0.0001)
    path = tmp_path / "many.jsonl"
    path.write_bytes(VALID * 10_000)  # a second or more: a redraw every 0.1 s
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "vmafx_sidecar", "send", "--socket", socket_path, str(path)],
                            stdout=subprocess.PIPE, stderr=terminal, env=cli_env(), cwd=ROOT)
    os.close(terminal)
    shown = b""
    while True:  # read as it comes, until the child closes the terminal
        select.select([controller], [], [], 30)
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the terminal's last user exited
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    stdout = proc.stdout.read().decode()
    assert proc.wait(30) == 0
    assert summary(stdout) == {"sent": "10000", "accepted": "10000", "rejected": "0"}
    redraws = shown.split(b"\r")
    assert len(redraws) >= 3, shown  # before the first "\r", at least one progress line and the final clearing
    assert re.match(rb"\d+ lines  \d+ lines/s  \d+% of 0\.5 MB  ETA \d+:\d\d:\d\d  accepted \d+  rejected 0\x1b\[K$",
                    redraws[1]), shown
    assert redraws[-1] == b"\x1b[K"  # cleared before the summary
    assert b"\n" not in shown
    server.join(10)


def test_send_and_status_without_a_sidecar_say_so_in_one_line(tmp_path):
    refusing = str(tmp_path / "dead.sock")  # a socket file nobody listens on, as a crashed sidecar leaves
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(refusing)
    data = tmp_path / "a.jsonl"
    data.write_bytes(VALID)
    missing = str(tmp_path / "missing.sock")
    for command, path, why in (("send", missing, "No such file or directory"), ("send", refusing, "Connection refused"),
                               ("status", missing, "No such file or directory")):
        done = cli(command, "--socket", path, *([str(data)] if command == "send" else []))
        assert done.returncode == 1 and done.stdout == b""
        assert done.stderr.decode() == f"vmafx-sidecar {command}: {path}: {why}\n"


def test_a_line_over_the_sidecars_limit_is_refused_without_being_held_or_sent(sidecar_factory, tmp_path):
    """A JSON array saved on one line, say: send learns the sidecar's line limit from its status and reads such a
    line on in pieces, so its memory does not grow with it, and the sidecar never sees it."""
    sidecar = sidecar_factory(**SERVER, VMAFX_SIDECAR_MAX_LINE_BYTES="4096")
    measured = ("import re, sys, vmafx_sidecar\nrc = vmafx_sidecar.main(sys.argv[1:])\n"
                "print(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read())[1], file=sys.stderr)\n"
                "sys.exit(rc)")
    peaks = {}
    for size in (0, 40 << 20):
        path = tmp_path / f"{size}.jsonl"
        path.write_bytes(VALID + b"[" + b"0.5," * (size // 4) + b"0.5]\n" + VALID if size else VALID * 2)
        done = subprocess.run([sys.executable, "-c", measured, "send", "--socket", sidecar.socket, str(path)],
                              capture_output=True, env=cli_env(), cwd=ROOT, timeout=120)
        peaks[size] = int(done.stderr.splitlines()[-1])  # kB
        stdout = done.stdout.decode()
        if size:
            assert done.returncode == 1, done.stderr
            assert summary(stdout) == {"sent": "2", "accepted": "2", "rejected": "1 (1 refused before sending)"}
            assert rejections(stdout) == [f"{path}:2: line too long (limit 4096 bytes)"]
    assert status(sidecar)["samples_rejected"] == 0  # the sidecar would have answered the same, had it been sent
    assert peaks[40 << 20] - peaks[0] < 8 * 1024, peaks  # held whole, the line alone would be 40 MB


@pytest.mark.parametrize("line", [b"x" * 10, b"x" * 11, b"x" * 9 + b"\r", b"x" * 10 + b"\r", b"x" * 12, b"x" * 100_000])
@pytest.mark.parametrize("last", [False, True], ids=["a line", "the last, without its newline"])
@pytest.mark.parametrize("bom", [False, True], ids=["", "after a BOM"])
def test_send_refuses_a_line_as_too_long_exactly_where_the_sidecar_would(tmp_path, line, last, bom):
    """Over the limit: more bytes than it before the newline, a carriage return included, a first line's BOM not
    (send drops it)."""
    data = (codecs.BOM_UTF8 if bom else b"") + line + (b"" if last else b"\nnext\n")
    lines = list(vf.json_lines(io.BufferedReader(io.BytesIO(data), 64), 10, vf.Tally(None, False)))
    trainer = make_trainer(tmp_path, n_features=4, max_line_bytes=10)
    server = vs.Server(trainer.config, trainer, NoState())
    conn = vs.Connection(None, server.on_connection_ready)
    server.take_lines(conn, line + b"\n")  # as send would have sent it
    refused = conn.outbuf == b'{"ok": false, "error": "line too long (limit 10 bytes)"}\n'
    assert lines == [None if refused else line + (b"" if last else b"\n"), *([] if last else [b"next\n"])]


def test_a_line_limit_past_what_a_read_can_ask_for_is_no_limit():
    """A sidecar runs with VMAFX_SIDECAR_MAX_LINE_BYTES 2**63 (an operator's "no limit"): send died reading its
    first line, OverflowError: cannot fit 'int' into an index-sized integer."""
    data = codecs.BOM_UTF8 + VALID + b"x" * 100_000 + b"\n"
    lines = list(vf.json_lines(io.BufferedReader(io.BytesIO(data), 64), 2**63, vf.Tally(None, False)))
    assert lines == [VALID, b"x" * 100_000 + b"\n"]


def test_a_blank_line_however_long_is_skipped_by_send_as_any_blank_line():
    data = b"\n" + b" \t" * 100 + b"\r\n" + b"x" * 11 + b" " * 100 + b"\n"
    lines = list(vf.json_lines(io.BufferedReader(io.BytesIO(data), 64), 10, vf.Tally(None, False)))
    assert lines == [b"\n", b"\n", None]


def test_send_from_a_closed_stdin_is_refused_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "vmafx_sidecar", "send", "--socket", str(tmp_path / "none.sock"), "-"],
                          stdin=subprocess.DEVNULL, capture_output=True, env=cli_env(), cwd=ROOT, timeout=60,
                          preexec_fn=lambda: os.close(0))
    assert done.returncode == 2 and "Traceback" not in done.stderr.decode()
    assert "-: standard input is closed" in done.stderr.decode()


def test_send_refuses_a_csv_that_is_a_pipe_before_connecting(tmp_path):
    """A CSV is read twice (every header is checked before anything is sent): from a pipe, that lost rows or hung."""
    os.mkfifo(tmp_path / "rows.csv")
    done = cli("send", "--socket", str(tmp_path / "none.sock"), str(tmp_path / "rows.csv"))
    assert done.returncode == 2 and "Traceback" not in done.stderr.decode()
    assert "rows.csv: not a regular file: a CSV is read twice" in done.stderr.decode()


def test_the_progress_of_a_file_that_grew_stops_at_its_size_at_the_start():
    tally = vf.Tally(1000, False)
    tally.bytes_read, tally.accepted = 1500, 10
    assert tally.progress(3.0) == "10 lines  3 lines/s  accepted 10  rejected 0"
    tally.bytes_read = 500
    assert tally.progress(3.0) == "10 lines  3 lines/s  50% of 0.0 MB  ETA 0:00:03  accepted 10  rejected 0"


def test_send_refuses_files_of_unknown_type_before_connecting(tmp_path):
    (tmp_path / "data.txt").write_text("1,2\n")
    done = cli("send", "--socket", str(tmp_path / "none.sock"), str(tmp_path / "data.txt"))
    assert done.returncode == 2
    assert "data.txt: unknown file type (expected .csv, .jsonl, .ndjson, .json or -)" in done.stderr.decode()


def test_send_refuses_a_directory_before_connecting(tmp_path):
    (tmp_path / "rows.csv").mkdir()
    done = cli("send", "--socket", str(tmp_path / "none.sock"), str(tmp_path / "rows.csv"))
    assert done.returncode == 2 and "Traceback" not in done.stderr.decode()
    assert "rows.csv: no such file, or not a readable one" in done.stderr.decode()


@pytest.mark.parametrize("bad_row", [b"1,2\r3,4,50\n", b"9" * 200_000 + b",2,3,4,50\n",
                                     b'1,2,3,"' + b"4" * 200_000 + b'\n1,2,3,4,60",50\n'],
                         ids=["a stray carriage return", "a cell past the size limit", "a quoted cell so, over lines"])
def test_a_row_the_csv_reader_cannot_read_stops_send_there_with_where_to_resume(sidecar_factory, tmp_path, bad_row):
    """Where the next row begins is unknown after it (inside a quoted cell, a line may look like a row)."""
    sidecar = sidecar_factory(**SERVER)
    path = tmp_path / "rows.csv"
    path.write_bytes(b"f0,f1,f2,f3,true_score\n1,2,3,4,50\n" + bad_row + b"1,2,3,4,70\n")
    rc, stdout, stderr = send(sidecar, str(path))
    assert rc == 1 and summary(stdout) == {"sent": "1", "accepted": "1", "rejected": "0"}
    assert f"cannot read on: {path}:" in stderr and ": not a CSV row: " in stderr
    assert f"the input was done up to {path}:2" in stderr
    assert status(sidecar)["samples_accepted"] == 1


def test_a_stray_quote_that_takes_the_rows_after_it_stops_send_at_its_line(sidecar_factory, tmp_path):
    """A quote that opens a cell takes every line up to the next quote into it: the row it makes has the wrong
    width, and the rows it took were never sent. Refused as one row (at its last line), it had hidden them; it
    stops send at its first line, with where to resume. A quoted cell over two lines that reads is a row."""
    sidecar = sidecar_factory(**SERVER)
    path = tmp_path / "rows.csv"
    path.write_bytes(b'job_id,f0,f1,f2,f3,true_score\n"enc\n7",1,2,3,4,50\nenc-8,1,"2,3,4,50\n'
                     + b"".join(b"enc-%d,1,2,3,4,60\n" % i for i in range(9, 40)))
    rc, stdout, stderr = send(sidecar, str(path))
    assert rc == 1 and summary(stdout) == {"sent": "1", "accepted": "1", "rejected": "0"}, stdout + stderr
    assert f"cannot read on: {path}:4: a quoted cell runs on to line 35, and the row does not read" in stderr
    assert f"the input was done up to {path}:3" in stderr
    assert status(sidecar)["samples_accepted"] == 1


def test_an_input_file_gone_midway_stops_send_with_how_far_it_got(sidecar_factory, tmp_path, capsys):
    sidecar = sidecar_factory(**SERVER)
    first = tmp_path / "first.jsonl"
    first.write_bytes(VALID * 3)
    assert vf.send_files([str(first), str(tmp_path / "gone.jsonl")], sidecar.socket, "true_score", None) == 1
    out, err = capsys.readouterr()
    assert summary(out) == {"sent": "3", "accepted": "3", "rejected": "0"}
    assert f"cannot read {tmp_path / 'gone.jsonl'} (No such file or directory)" in err
    assert f"the input was done up to {first}:3" in err


def test_connection_lost_midway_says_how_far_the_sidecar_acknowledged(sidecar_factory, tmp_path):
    sidecar = sidecar_factory(**SERVER)
    path = tmp_path / "big.jsonl"
    path.write_bytes(VALID * 200_000)
    proc = subprocess.Popen([sys.executable, "-m", "vmafx_sidecar", "send", "--socket", sidecar.socket, str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(), cwd=ROOT)
    deadline = time.monotonic() + 30
    while status(sidecar)["samples_accepted"] < 2000:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    assert sidecar.stop(signal.SIGTERM) == 0
    stdout, stderr = (s.decode() for s in proc.communicate(timeout=30))

    assert proc.returncode == 1, stdout + stderr
    match = re.fullmatch(rf"vmafx-sidecar send: connection to {re.escape(sidecar.socket)} lost \((.+)\) after "
                         rf"(\d+) lines were acknowledged; the input was done up to {re.escape(str(path))}:(\d+)\n",
                         stderr)
    assert match, stderr
    acknowledged = int(match.group(2))
    assert 2000 <= acknowledged < 200_000 and int(match.group(3)) == acknowledged
    assert summary(stdout)["accepted"] == str(acknowledged) and int(summary(stdout)["sent"]) >= acknowledged
    # Every acknowledged sample survived the stop: the rest of the file is what is left to send.
    assert status(sidecar_factory(**SERVER))["samples_accepted"] == acknowledged


# ---- status ----

@pytest.mark.parametrize("timeout", ["-1", "0", "nan", "inf", "1e20", "soon"])
@pytest.mark.parametrize("command", ["status", "probe"])
def test_a_timeout_a_socket_cannot_take_is_refused_in_one_line(tmp_path, command, timeout):
    done = cli(command, "--socket", str(tmp_path / "none.sock"), "--timeout", timeout)
    assert done.returncode == 2 and "Traceback" not in done.stderr.decode()
    assert f"argument --timeout: {timeout!r}: expected seconds, more than 0 and at most 86400" in done.stderr.decode()


@pytest.mark.parametrize("path", ["", " ", "/tmp/x.sock\n"])
@pytest.mark.parametrize("command", ["status", "probe", "send"])
def test_a_socket_path_the_sidecar_would_refuse_is_named_in_one_line(tmp_path, command, path):
    # From the environment too, where an empty value is easy to leave: connect() said only "Invalid argument".
    (rows := tmp_path / "rows.jsonl").write_text("")
    args = [command, str(rows)] if command == "send" else [command]
    for done in (cli(*args, VMAFX_SIDECAR_SOCKET=path), cli(*args, "--socket", path)):
        assert done.returncode == 2 and "Traceback" not in done.stderr.decode()
        assert (f"argument --socket: {path!r}: expected a socket path, not empty, without spaces or line breaks "
                f"around it (from --socket or $VMAFX_SIDECAR_SOCKET)") in done.stderr.decode()


def test_status_prints_a_table_and_json(sidecar_factory):
    # A checkpoint after the first step, so that the gate record is there to flatten; the gate off, so that
    # it is published (two samples are too little evidence) and checkpoint_version is a number.
    sidecar = sidecar_factory(**SERVER, VMAFX_SIDECAR_BATCH_SIZE="2", VMAFX_SIDECAR_REPLAY_MIX="0",
                              VMAFX_SIDECAR_CKPT_INTERVAL_S="0", VMAFX_SIDECAR_MIN_SAMPLES_CKPT="1",
                              VMAFX_SIDECAR_GATE="off")
    client = sidecar.client()
    for _ in range(3):
        assert client.request(VALID.rstrip())["ok"]
    assert not client.request(SHORT.rstrip())["ok"]

    done = cli("status", VMAFX_SIDECAR_SOCKET=sidecar.socket)  # the socket from the environment

    assert done.returncode == 0, done.stderr
    table = done.stdout.decode()
    rows = dict(line.split(None, 1) for line in table.splitlines())
    assert {"steps": "1", "samples_accepted": "3", "samples_rejected": "1", "pending": "1", "checkpoint_version": "1",
            "gate.version": "1", "gate.gate": "off", "gate.reason": "published unjudged: VMAFX_SIDECAR_GATE=off",
            "gate.metrics.candidate": "-", "gate.metrics.window.n": "2", "gate.metrics.history.n": "0",
            "window.n": "0", "window.candidate": "-",  # the live window, new since that checkpoint
            "activations": "relu", "model": "4-64-1", "config.n_features": "4",
            "config.base_model_path": '""'}.items() <= rows.items()
    assert "ok" not in rows and "op" not in rows and "gate" not in rows
    assert len({len(line) - len(value) for line, value in zip(table.splitlines(), rows.values())}) == 1  # aligned

    done = cli("status", "--json", "--socket", sidecar.socket)
    assert done.returncode == 0
    answer, direct = json.loads(done.stdout), client.request({"op": "status"})
    assert list(answer) == list(direct) and answer["ok"] is True and answer["op"] == "status"
    assert {k: v for k, v in answer.items() if k not in ("uptime_s", "connections")} == \
           {k: v for k, v in direct.items() if k not in ("uptime_s", "connections")}


def answering_once(path: str, answer: bytes) -> threading.Thread:
    """A stand-in sidecar that reads one request and answers it with `answer`."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def serve() -> None:
        with listener, listener.accept()[0] as conn:
            conn.recv(4096)
            conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("command", ["status", "checkpoints"])
def test_a_reader_gone_before_the_output_ends_it_quietly(tmp_path, command):
    """`vmafx-sidecar status | head`: status ended in a BrokenPipeError's traceback, and checkpoints blamed its
    directory for the pipe ("vmafx-sidecar checkpoints: DIR: Broken pipe")."""
    path = str(tmp_path / "s.sock")
    if command == "status":
        answering_once(path, b'{"ok": true, "op": "status", "steps": 0, "samples_accepted": 0}\n')
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone
    try:
        done = subprocess.run([sys.executable, "-m", "vmafx_sidecar", command,
                               *(["--socket", path] if command == "status" else [str(tmp_path)])],
                              stdout=write_end, stderr=subprocess.PIPE, env=cli_env(), cwd=ROOT, timeout=120)
    finally:
        os.close(write_end)
    assert done.returncode == 1 and done.stderr == b"", done


def test_a_broken_pipe_of_the_commands_own_is_not_taken_for_a_reader_gone(monkeypatch):
    """Every BrokenPipeError ended a command quietly: the demo whose server died mid-stream exited 1 and said
    nothing."""
    read_end, write_end = os.pipe()
    with open(write_end, "w") as stdout:
        monkeypatch.setattr(sys, "stdout", stdout)

        def sends_to_a_server_gone(args):
            raise BrokenPipeError(32, "Broken pipe")
        monkeypatch.setattr(vs, "run_command", sends_to_a_server_gone)
        with pytest.raises(BrokenPipeError):
            vs.main(["status"])
        assert not vs.has_lost_its_reader(stdout)
        os.close(read_end)
        assert vs.has_lost_its_reader(stdout)


@pytest.mark.parametrize("answer, said", [
    (b'{"ok": false, "error": "line too long (limit 8 bytes)"}\n', "refused: line too long (limit 8 bytes)"),
    (b'{"ok": false, "error": "unknown op \'status\' (known: ping)"}\n', "refused: unknown op 'status'"),
    (b'[1]\n', "unexpected answer b'[1]\\n'"), (b"null\n", "unexpected answer b'null\\n'"),
    (b"{}\n", "unexpected answer b'{}\\n'"), (b'{"ok": true, "op": "pong"}\n', "unexpected answer"),
    (b"[" * 100_000 + b"\n", "unexpected answer b'[[["),
], ids=["refused", "an older sidecar", "a list", "null", "empty", "another op", "nested too deeply"])
@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
def test_status_fails_in_one_line_on_an_answer_that_is_not_a_status(tmp_path, answer, said, as_json):
    path = str(tmp_path / "s.sock")
    server = answering_once(path, answer)
    done = cli("status", "--socket", path, *(["--json"] if as_json else []))
    server.join(10)
    assert done.returncode == 1 and done.stdout == b"", done
    assert done.stderr.decode().startswith(f"vmafx-sidecar status: {path}: {said}") and done.stderr.count(b"\n") == 1


@pytest.mark.parametrize("answer", [b"null\n", b"[]\n", b'{"ok": true, "config": []}\n',
                                    b'{"ok": true, "config": {"max_line_bytes": 1e400}}\n'])
def test_send_fails_in_one_line_on_a_status_answer_that_is_json_but_not_a_status(tmp_path, answer):
    """An answer that was JSON but not an object ended send in an AttributeError's traceback (the producer hunt);
    one whose line limit JSON reads as infinite, in an OverflowError's (the fuzz hunt)."""
    path = str(tmp_path / "s.sock")
    server = answering_once(path, answer)
    done = cli("send", "--socket", path, "-", stdin=b"")
    server.join(10)
    assert done.returncode == 1 and b"Traceback" not in done.stderr, done.stderr
    assert b"its answer to a status request was not a status" in done.stderr


def test_send_closed_unanswered_says_so_not_that_the_answer_was_not_a_status(tmp_path):
    """A sidecar with every place taken, the probes' reserve included, closes a connection unanswered: send said its
    answer to a status request was not a status (the coverage hunt)."""
    path = str(tmp_path / "s.sock")
    server = answering_once(path, b"")
    done = cli("send", "--socket", path, "-", stdin=b"")
    server.join(10)
    assert done.returncode == 1 and b"closed unanswered: the sidecar is stopping, or serves" in done.stderr, done.stderr


def flooding(path: str) -> threading.Event:
    """A foreign server on `path` that answers each connection with one line that never ends, until the event is
    set."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        with listener:
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                with conn:
                    try:
                        while not stop.is_set():
                            conn.sendall(b"x" * 65536)
                    except OSError:  # the client gave up
                        pass

    threading.Thread(target=serve, daemon=True).start()
    return stop


@pytest.mark.parametrize("command", ["probe", "status", "send"])
def test_an_answer_that_never_ends_is_given_up_past_any_of_the_sidecars(tmp_path, command):
    """A foreign server writing one endless line: its answer was read unbounded, send's past --timeout, taking
    gigabytes in seconds (the producer hunt). Past the longest answer the sidecar gives, it is not the sidecar's."""
    path = str(tmp_path / "s.sock")
    stop = flooding(path)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "vmafx_sidecar", command, "--socket", path, "--timeout", "30",
                                 *(["-"] if command == "send" else [])], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(), cwd=ROOT)
        _, stderr = proc.communicate(b"", timeout=60)
    finally:
        stop.set()
    assert proc.returncode == 1 and b"Traceback" not in stderr, stderr
    said = {"send": b"its answer to a status request was not a status"}.get(command, vf.NOT_AN_ANSWER.encode())
    assert said in stderr, stderr


def stalling_sidecar(path: str, answered: int, answer: bytes = b'{"ok": true, "step": 0, "trained": false}\n'
                     ) -> tuple[threading.Thread, threading.Event]:
    """A stand-in for the sidecar on `path` that answers send's status request (if `answered` >= 0) and then
    `answered` samples with `answer`, and after that answers nothing, its connection open, until the event is
    set."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    done = threading.Event()

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
        with conn, conn.makefile("rb") as lines:
            if answered >= 0:
                next(lines)
                conn.sendall(b'{"ok": true, "op": "status", "config": {"max_line_bytes": 1048576}}\n')
                for _ in range(answered):
                    next(lines)
                    conn.sendall(answer)
            done.wait(30)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread, done


def send_to_a_stand_in(tmp_path: Path, lines: int, timeout: str, *served: Any
                       ) -> tuple[str, Path, subprocess.CompletedProcess]:
    """send's run with `lines` valid lines against stalling_sidecar(path, *served), which fails it: the socket's
    path, the input and the result."""
    path, data = str(tmp_path / "stand-in.sock"), tmp_path / "a.jsonl"
    data.write_bytes(VALID * lines)
    server, done = stalling_sidecar(path, *served)
    try:
        result = cli("send", "--socket", path, "--timeout", timeout, str(data))
    finally:
        done.set()
        server.join(10)
    assert result.returncode == 1 and b"Traceback" not in result.stderr, result.stderr
    return path, data, result


@pytest.mark.parametrize("answered", [-1, 0, 3], ids=["not even the status", "the status only", "three samples"])
def test_send_gives_up_on_a_sidecar_that_stops_answering_and_says_how_far_it_got(tmp_path, answered):
    started = time.monotonic()
    path, data, result = send_to_a_stand_in(tmp_path, 10, "0.5", answered)
    stderr = result.stderr.decode()
    assert time.monotonic() - started < 20
    acknowledged = max(answered, 0)
    assert stderr.endswith(f"vmafx-sidecar send: no answer from {path} within 0.5 s after {acknowledged} lines were "
                           f"acknowledged" + (f"; the input was done up to {data}:{acknowledged}\n" if acknowledged
                                               else "\n")), stderr
    assert summary(result.stdout.decode())["accepted"] == str(acknowledged)


@pytest.mark.parametrize("answer", [b'["ok"]\n', b'{"ok": 1}\n', b"[" * 100_000 + b"\n", b"not json\n"],
                         ids=["a list", "ok not a boolean", "nested too deeply", "not JSON"])
def test_send_stops_in_one_line_on_an_answer_that_is_not_an_ack(tmp_path, answer):
    """Not the sidecar's: the line it answers is not settled by it, and send stops as on a lost connection."""
    path, _, result = send_to_a_stand_in(tmp_path, 3, "5", 1, answer)
    stderr = result.stderr.decode()
    assert stderr == (f"vmafx-sidecar send: connection to {path} lost (unexpected answer {answer[:200]!r}) after 0 "
                      f"lines were acknowledged\n"), stderr


def test_send_stops_in_one_line_on_an_ack_longer_than_any_of_the_sidecars(tmp_path):
    """An ACK is read to at most ANSWER_MAX_BYTES, as the status answer is: a foreign server's endless line was read
    unbounded (f200d8b); past the bound it is no answer of the sidecar's, said as such."""
    answer = b"x" * (vf.ANSWER_MAX_BYTES + 10) + b"\n"
    path, _, result = send_to_a_stand_in(tmp_path, 3, "5", 1, answer)
    stderr = result.stderr.decode()
    assert stderr == (f"vmafx-sidecar send: connection to {path} lost ({vf.NOT_AN_ANSWER}) after 0 lines were "
                      f"acknowledged\n"), stderr[:300]


def test_send_to_a_sidecar_at_its_connection_limit_says_so(sidecar_factory, tmp_path):
    """Its status request is answered from the reserve kept for probes, and the connection closed at the first sample:
    send had reported a lost connection, as if the sidecar had stopped."""
    sidecar = sidecar_factory(VMAFX_SIDECAR_N_FEATURES="4", VMAFX_SIDECAR_MAX_CONNECTIONS="1")
    node = sidecar.client()  # the one connection the limit allows
    assert node.request({"op": "ping"})["ok"]
    path = tmp_path / "jobs.jsonl"
    path.write_bytes(VALID * 5)
    code, _, stderr = send(sidecar, str(path))
    assert code == 1 and "lost" in stderr and "try again once one closes" in stderr, stderr
    assert node.request({"op": "status"})["samples_accepted"] == 0


def test_send_holding_the_last_place_of_a_sidecar_that_stops_does_not_blame_the_limit(sidecar_factory):
    """Its status counts send's own connection: holding the last place of a sidecar killed before the first line,
    send blamed the limit for the lost connection (the review)."""
    sidecar = sidecar_factory(VMAFX_SIDECAR_N_FEATURES="4", VMAFX_SIDECAR_MAX_CONNECTIONS="2")
    node = sidecar.client()
    proc = subprocess.Popen([sys.executable, "-m", "vmafx_sidecar", "send", "--socket", sidecar.socket, "-"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(),
                            cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while node.request({"op": "status"})["connections"] < 2:  # send holds the other place
            assert time.monotonic() < deadline
            time.sleep(0.05)
        sidecar.stop(signal.SIGKILL)
        _, stderr = proc.communicate(VALID * 3, timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1 and "lost" in stderr.decode() and "try again" not in stderr.decode(), stderr


def sending_three_lines_from_a_pipe(sidecar) -> subprocess.Popen:
    """`send -` reading a pipe that stays open, once the sidecar has accepted the three lines written to it."""
    proc = subprocess.Popen([sys.executable, "-m", "vmafx_sidecar", "send", "--socket", sidecar.socket, "-"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(),
                            cwd=ROOT)
    proc.stdin.write(VALID * 3)
    proc.stdin.flush()
    deadline = time.monotonic() + 30
    while status(sidecar)["samples_accepted"] < 3:
        if time.monotonic() >= deadline:
            proc.kill()
            raise AssertionError("the lines read were not sent")
        time.sleep(0.05)
    return proc


def test_send_from_a_pipe_delivers_each_line_as_it_is_read(sidecar_factory):
    """`tail -f jobs.jsonl | vmafx-sidecar send -`: lines waited for 256 of them, or the input's end, before any went
    out; a slow producer's samples were held back without limit (the new-user hunt)."""
    sidecar = sidecar_factory(**SERVER)
    proc = sending_three_lines_from_a_pipe(sidecar)
    try:
        _, stderr = proc.communicate(VALID, timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert status(sidecar)["samples_accepted"] == 4


def test_send_from_a_pipe_tells_of_a_sidecar_gone_at_the_next_line_not_at_the_inputs_end(sidecar_factory):
    """From a pipe, ACKs were read only every 256 lines or at the input's end, and a failed write ignored: after a
    restart of the sidecar, `tail -f | send -` went on reading and dropping lines, for hours at a slow producer's
    pace, before it told (the producer and coverage hunts). Its ACKs are read whenever the input waits."""
    sidecar = sidecar_factory(**SERVER)
    proc = sending_three_lines_from_a_pipe(sidecar)
    try:
        sidecar.stop(signal.SIGKILL)
        proc.stdin.write(VALID)
        proc.stdin.flush()
        assert proc.wait(timeout=20) == 1, "send waits for the input's end to tell"
        stderr = proc.stderr.read().decode()
    finally:
        proc.kill()
    assert "lost" in stderr and "the input was done up to <stdin>:3" in stderr, stderr


def test_send_from_a_named_pipe_delivers_each_line_as_it_is_written(sidecar_factory, tmp_path):
    """A FIFO named as a .jsonl file held its lines until its writer closed it, as standard input from a pipe had."""
    sidecar = sidecar_factory(**SERVER)
    fifo = tmp_path / "jobs.jsonl"
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, "-m", "vmafx_sidecar", "send", "--socket", sidecar.socket, str(fifo)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(), cwd=ROOT)
    try:
        with open(fifo, "wb") as writer:
            writer.write(VALID * 3)
            writer.flush()  # and the FIFO stays open
            deadline = time.monotonic() + 30
            while status(sidecar)["samples_accepted"] < 3:
                assert time.monotonic() < deadline, "the lines written were not sent"
                time.sleep(0.05)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
