"""Request parsing and ACK framing, in-process: exact errors, and properties over arbitrary input."""
from __future__ import annotations

import json
import math
import pickle
import re
import struct
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import vmafx_sidecar as vs
from conftest import NoState, make_trainer


def make_server(tmp_path, **settings_) -> vs.Server:
    trainer = make_trainer(tmp_path, sizes=[3, 5, 1], batch_size=4, replay_capacity=8, **settings_)
    return vs.Server(trainer.config, trainer, NoState())


@pytest.mark.parametrize("line,error", [
    (b'{"features": [1, 2, 3], "true_score": 1', "not valid JSON"),
    (b"\xff\xfe", "not valid JSON: the line is not UTF-8"),
    (b"[" * 100000, "not valid JSON"),
    (b"[1, 2]", "expected a JSON object, got array"),
    (b'"x"', "expected a JSON object, got string"),
    (b'{"true_score": 1}', "features: missing"),
    (b'{"features": "1,2,3", "true_score": 1}', "features: expected a list of 3 numbers, got string"),
    (b'{"features": [1, 2], "true_score": 1}', "features: expected 3 numbers, got 2"),
    (b'{"features": [1, "2", 3], "true_score": 1}', "features[1]: expected a number, got string"),
    (b'{"features": [1, 2, true], "true_score": 1}', "features[2]: expected a number, got boolean"),
    (b'{"features": [null, 2, 3], "true_score": 1}', "features[0]: expected a number, got null"),
    (b'{"features": [1, [2], 3], "true_score": 1}', "features[1]: expected a number, got array"),
    (b'{"features": [1, NaN, 3], "true_score": 1}', "features[1]: not a finite number"),
    (b'{"features": [1, 2, -Infinity], "true_score": 1}', "features[2]: not a finite number"),
    (b'{"features": [1e999, 2, 3], "true_score": 1}', "features[0]: not a finite number"),
    (b'{"features": [1, 1e39, 3], "true_score": 1}', "features[1]: outside the float32 range"),
    (b'{"features": [1, 2, 1' + b"0" * 400 + b'], "true_score": 1}', "features[2]: outside the float32 range"),
    # Past the 4 300 digits Python converts: valid JSON all the same, not "Exceeds the limit ... for integer string".
    (b'{"features": [1, 2, 1' + b"0" * 4400 + b'], "true_score": 1}', "features[2]: outside the float32 range"),
    (b'{"features": [1, 2, 3], "true_score": -1' + b"0" * 4400 + b'}', "true_score: outside the float32 range"),
    (b'{"features": [1, 2, 3]}', "true_score: missing"),
    (b'{"features": [1, 2, 3], "true_score": "87"}', "true_score: expected a number, got string"),
    (b'{"features": [1, 2, 3], "true_score": false}', "true_score: expected a number, got boolean"),
    (b'{"features": [1, 2, 3], "true_score": NaN}', "true_score: not a finite number"),
    (b'{"features": [1, 2, 3], "true_score": 1e999}', "true_score: not a finite number"),
    (b'{"features": [1, 2, 3], "true_score": 1, "job_id": 7}', "job_id: expected a string, got number"),
    (b'{"features": [1, 2, 3], "true_score": 1, "job_id": "%s"}' % (b"x" * 65536), "job_id: longer than 65535 bytes"),
    (b'{"features": [1, 2, 3], "true_score": 1, "job_id": "%s"}' % (b"\\ud800" * 21846),  # 3 bytes each in UTF-8
     "job_id: longer than 65535 bytes"),
    (b'{"op": 1}', "op: expected a string, got number"),
    (b'{"op": false, "features": [1, 2, 3], "true_score": 1}', "op: expected a string, got boolean"),
    (b'{"op": ""}', "features: missing"),
])
def test_malformed_lines_get_specific_errors(line, error):
    with pytest.raises(vs.BadRequest) as raised:
        vs.parse_request(line, 3)
    assert raised.value.error.startswith(error), raised.value.error


@pytest.mark.parametrize("value", ["3.4028236e38", "3.40283e38", "-3.403e38", "1e39"])
def test_the_float32_range_error_names_a_bound_the_value_is_beyond(value):
    """It said "magnitude above 3.403e+38" of 3.4028236e38 and 3.40283e38, both below that (the words hunt)."""
    with pytest.raises(vs.BadRequest) as raised:
        vs.parse_request(b'{"features": [1, %s, 3], "true_score": 1}' % value.encode(), 3)
    bound = float(re.fullmatch(r"features\[1\]: outside the float32 range \(magnitude above (\S+): infinite in "
                               r"float32\)", raised.value.error)[1])
    assert abs(float(value)) > bound
    assert struct.unpack("<f", struct.pack("<f", bound)) == (vs.feedback.F32_MAX,)  # the bound is taken,
    with pytest.raises(OverflowError):  # and the next number is infinite in float32
        struct.pack("<f", math.nextafter(bound, math.inf))


def test_valid_lines():
    sample = vs.parse_request(b'{"job_id": "enc-1", "features": [0, 1.5, -3e38], "true_score": 87}', 3)
    assert sample == vs.Sample([0, 1.5, -3e38], 87, "enc-1")
    assert vs.parse_request(b' {"op": "ping"} \r', 3) == vs.Control("ping", None)
    huge = b"9" * 5000  # in a field the sidecar ignores
    assert vs.parse_request(b'{"features": [1, 2, 3], "true_score": 4, "x": %s}' % huge, 3) == vs.Sample([1, 2, 3], 4,
                                                                                                        None)


@pytest.mark.parametrize("op", [b'""', b"null"])
def test_a_sample_with_an_empty_or_null_op_is_a_sample(op):
    """A Go request struct with an Op field for control messages writes "op": "" (a string) or "op": null (a
    pointer) into every sample it sends: each was refused, as an unknown op or an op that is not a string."""
    line = b'{"op": %s, "job_id": "enc-1", "features": [0, 1.5, 2], "true_score": 87}' % op
    assert vs.parse_request(line, 3) == vs.Sample([0, 1.5, 2], 87, "enc-1")


def test_error_echoes_job_id_when_it_is_a_string(tmp_path):
    server = make_server(tmp_path)
    assert server.answer(b'{"job_id": "enc-8850", "features": [1, 2]}') == (
        b'{"ok": false, "error": "features: expected 3 numbers, got 2", "job_id": "enc-8850"}\n')
    assert server.answer(b'{"job_id": "a", "op": "nope"}') == (
        b'{"ok": false, "error": "unknown op \'nope\' (known: ping, status)", "job_id": "a"}\n')


def test_an_unknown_op_is_repeated_only_in_part(tmp_path):
    """repr() and JSON escaping made an op of 300 000 DEL characters an ACK of 1.5 MB, past what the sidecar holds
    for a client: it dropped the connection mid-ACK. An op of exactly OP_SHOWN characters is repeated whole, with no
    "..." (mutation hunt)."""
    server = make_server(tmp_path)
    ack = json.loads(server.answer(b'{"op": "' + b"\x7f" * 300_000 + b'"}'))
    assert ack["error"] == f"unknown op {chr(0x7f) * vs.OP_SHOWN + '...'!r} (known: ping, status)"
    ack = json.loads(server.answer(b'{"op": "' + b"y" * vs.OP_SHOWN + b'"}'))
    assert ack["error"] == f"unknown op {'y' * vs.OP_SHOWN!r} (known: ping, status)"


def test_samples_with_an_empty_job_id_are_held_out_by_count_like_samples_without_one(tmp_path):
    """A job_id of "" (Go's unset string) picks its side by the count of unnamed samples; when such samples did not
    advance that count, none of them was ever held out (mutation hunt)."""
    held_out = []
    for i, job_id in enumerate(["", None]):
        server = make_server(tmp_path / str(i))
        for k in range(40):
            server.answer(json.dumps({"features": [1, 2, k], "true_score": 50.0, "job_id": job_id}).encode())
        held_out.append(server.status()["samples_held_out"])
    assert held_out[0] == held_out[1] > 0, held_out


def test_ack_fields_in_go_client_order(tmp_path):
    server = make_server(tmp_path, replay_mix=0.5)  # batch 4: a step every 2 new samples
    line = b'{"job_id": "enc-1", "features": [0.1, 0.2, 0.3], "true_score": 1.5}'
    assert server.answer(line) == b'{"ok": true, "step": 0, "trained": false, "job_id": "enc-1"}\n'
    ack = server.answer(line)
    assert list(json.loads(ack)) == ["ok", "step", "trained", "loss", "job_id"]
    assert ack.startswith(b'{"ok": true, "step": 1, "trained": true, "loss": ')


@settings(max_examples=500)
@given(step=st.integers(0, 2**63), job_id=st.none() | st.text(st.characters(blacklist_categories=()), max_size=12))
def test_the_untrained_ack_is_json_dumps_byte_for_byte(step, job_id):
    """Every character a job_id can bring, lone surrogates from \\ud800 escapes too."""
    assert vs.untrained_ack(step, job_id) == vs.encode_ack({"ok": True, "step": step, "trained": False}, job_id)


# ---- properties: whatever arrives, exactly one well-formed ACK per non-blank line ----

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=12)
request_like = st.fixed_dictionaries(
    {}, optional={"features": st.lists(st.floats(-10, 10), min_size=2, max_size=4) | json_values,
                  "true_score": st.floats(-100, 100) | json_values,
                  "job_id": st.text(max_size=8) | json_values,
                  "op": st.sampled_from(["ping", "bogus"]) | json_values})
lines = st.one_of(
    request_like.map(lambda m: json.dumps(m).encode()),
    request_like.map(lambda m: json.dumps(m, ensure_ascii=False).encode()).flatmap(  # cut anywhere, even
        lambda b: st.integers(0, len(b)).map(lambda i: b[:i])),  # inside a multi-byte UTF-8 character
    st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"")),
    st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * (n // 2)),  # deep nesting
    st.integers(300, 5000).map(lambda n: b'{"features": [1' + b"0" * n + b'], "true_score": 1e' + str(n).encode()
                               + b"}"),  # huge numbers
    st.sampled_from([  # duplicate keys: the last one wins, as in Go's encoding/json
        b'{"features": "x", "features": [1, 2, 3], "true_score": 1, "true_score": "y"}',
        b'{"op": "ping", "op": 3}']),
    st.sampled_from([b"", b"   ", b"\r", b"x" * 200]))


def json_outcome(decode: Callable[[str], Any], text: str) -> tuple[str, bytes | str]:
    """What decode(text) gives: its value (pickled: floats bit for bit, keys in order) or its error."""
    try:
        return "value", pickle.dumps(decode(text))
    except (ValueError, RecursionError) as e:
        return type(e).__name__, str(e)


float32_shortest = st.floats(width=32, allow_nan=False, allow_infinity=False).map(lambda f: repr(float(f)))
texts = st.one_of(
    lines.map(lambda b: b.decode("utf-8", "replace")),
    st.lists(float32_shortest | st.sampled_from(["-0", "-0.0", "1e308", "1E-7", "00", "01", "1.", ".5", "NaN",
                                                 "-Infinity", "true", "null", '"\\u00e9"']), max_size=8).map(
        lambda values: '{"features": [' + ", ".join(values) + '], "true_score": 1}'),
    st.text(max_size=40))


@settings(max_examples=1000, deadline=None)
@given(text=texts, before=st.sampled_from(["", " ", "\ufeff", "\t\r"]), after=st.sampled_from(["", " ", "\r", "x", "{}"]))
def test_decoded_json_is_json_loads_value_for_value_and_error_for_error(text, before, after):
    """The parser's fast path, json.loads' own scanner without its wrappers, against json.loads itself, which
    converts integers as the sidecar does past the 4 300 digits Python converts (see json_int)."""
    text = before + text + after
    assert json_outcome(vs.decoded_json, text) == json_outcome(lambda t: json.loads(t, parse_int=vs.json_int), text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(line=lines)
@example(line=b'{"job_id": "00000000", "features": [1, 2, 3], "true_score": 1}')  # held out: random seeds found it
def test_any_line_gets_one_strict_json_ack(tmp_path, line):
    server = make_server(tmp_path)
    ack = server.answer(line)
    if not line.strip():
        assert ack == b""
        return
    assert ack.endswith(b"\n") and ack.count(b"\n") == 1
    fields = json.loads(ack, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in ACK"))
    assert type(fields["ok"]) is bool
    if not fields["ok"]:
        assert fields["error"]
    status = server.status()
    # nothing rejected reached a ring; a job_id such as "00000000" is held out, into the evaluation ring
    assert status["samples_accepted"] == status["replay_size"] + status["eval_size"]
    assert sum(server.rejections.values()) == status["samples_rejected"]  # every rejection has a reason


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stream=st.lists(lines, max_size=12), cuts=st.lists(st.integers(0, 2000), max_size=40))
def test_acks_do_not_depend_on_how_bytes_are_split(tmp_path, stream, cuts):
    data = b"".join(line + b"\n" for line in stream)
    whole, pieces = make_server(tmp_path, max_line_bytes=100), make_server(tmp_path, max_line_bytes=100)
    conn_whole, conn_pieces = (vs.Connection(None, s.on_connection_ready) for s in (whole, pieces))
    whole.take_lines(conn_whole, data)
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    for start, end in zip(bounds, bounds[1:]):
        pieces.take_lines(conn_pieces, data[start:end])
    uptime = re.compile(rb'"uptime_s": [0-9.e-]+')  # a status op's answer holds the server's age
    assert uptime.sub(b"", conn_pieces.outbuf) == uptime.sub(b"", conn_whole.outbuf)
    assert conn_whole.outbuf.count(b"\n") == sum(1 for line in stream if line.strip() or len(line) > 100)
    assert len(conn_pieces.inbuf) <= 100  # a partial line is never buffered past the limit
