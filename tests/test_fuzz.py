"""Fuzzing the session's app (tests/conftest.py), bounded so that the default suite stays quick; scripts/fuzz.sh
runs the same tests with budgets GENSERVE_FUZZ_SCALE times larger.

- schemathesis against /openapi.json: every documented operation, with positive and negative cases drawn by
  Hypothesis, derandomized: no answer is a 5xx, every answer is documented (status, content type, headers,
  body schema), and invalid data is refused.
- gRPC ModelInfer: valid requests serialized, then bytes flipped, cut short, extended and inserted, and bytes at
  random, on a raw channel: every answer is a status code that says what was wrong, never UNKNOWN or INTERNAL,
  never a traceback, and the server keeps serving (bytes that do not parse at all get INVALID_ARGUMENT too:
  the Serve config registers the service through serving.api.kserve_grpc's tolerant registration).
- HTTP below the app (Triton's L0_http_fuzz is the model): garbage methods, huge and invalid request lines,
  invalid header bytes, bad Content-Length and Transfer-Encoding on raw sockets get a 4xx (from Serve's proxy
  or the app) or a closed connection; mutations of valid requests get no 5xx; and a normal request afterwards
  is served."""
from __future__ import annotations

import os
import random
import socket
import urllib.parse
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import hypothesis
import pytest
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                               response_headers_conformance, response_schema_conformance,
                                               status_code_conformance)

from tests.helpers import SERVED_FAMILIES, http_json
from tests.test_edge_limits import leaks, own_messages

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's, not ours
SCALE = float(os.environ.get("GENSERVE_FUZZ_SCALE", "1"))   # scripts/fuzz.sh: a longer run


def budget(n: int) -> int:
    return max(1, round(n * SCALE))


# ---- schemathesis against the OpenAPI document ---------------------------------------------------------------

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection]
FUZZ_SLO_MS = 2000   # positive cases: a generation the policy cannot finish in this is refused at once (429)


def _affordable(case) -> None:
    """A positive case made cheap to serve: a generation gets a latency SLO of FUZZ_SLO_MS at most (so a
    1000-step diffusion request is refused at once rather than run), and a random {model} in the path
    becomes a served one, so that the model's own checks are reached too."""
    if "model" in (case.path_parameters or {}):
        case.path_parameters["model"] = SERVED_FAMILIES[len(str(case.path_parameters["model"])) % len(SERVED_FAMILIES)]
    body, path = case.body, case.operation.path
    if not isinstance(body, dict) or not (path == "/v1/images/generations" or path.endswith("/infer")):
        return
    if path.endswith("/infer"):
        if body.get("parameters") is None:
            body["parameters"] = {}
        body = body["parameters"]
        body.pop("timeout", None)
    slo = body.get("latency_slo_ms")
    body["latency_slo_ms"] = FUZZ_SLO_MS if slo is None else min(slo, FUZZ_SLO_MS)


def test_every_documented_operation_answers_as_documented(server):
    """Each operation: budget(8) positive and budget(8) negative cases, derandomized; every failing
    operation is reported, with its first failing case."""
    api = schemathesis.openapi.from_url(server["url"] + "/openapi.json")
    settings = hypothesis.settings(max_examples=budget(8), derandomize=True, database=None, deadline=None,
                                   phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
                                   suppress_health_check=list(hypothesis.HealthCheck), print_blob=False)
    failures, operations, statuses = [], 0, Counter()
    for result in api.get_all_operations():
        operation = result.ok()
        operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings
            @hypothesis.given(operation.as_strategy(generation_mode=mode))
            def fuzz(case):
                if mode is GenerationMode.POSITIVE:
                    _affordable(case)
                statuses[case.call_and_validate(base_url=server["url"], checks=CHECKS, timeout=60).status_code] += 1
            try:
                fuzz()
            except hypothesis.errors.Unsatisfiable:   # a negative case of an operation with nothing to get wrong
                pass
            except Exception as exc:   # schemathesis's failures, as one list for every operation
                failures.append(f"{operation.label} ({mode.value}): {exc}")
    assert operations >= 20
    assert not failures, "\n\n".join(failures)
    print(f"schemathesis: {sum(statuses.values())} requests, by status {dict(sorted(statuses.items()))}")
    assert statuses[200] and statuses[400] and statuses[404]   # it reached the models, the checks, the lookups


# ---- gRPC: ModelInfer from mutated bytes ---------------------------------------------------------------------

TOLERANT_REGISTRATION = "serving.api.kserve_grpc.add_GRPCInferenceServiceServicer_to_server"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def _valid_requests(Request) -> list[bytes]:
    """Serialized ModelInfer requests the server serves: typed and raw contents, parameters, an output."""
    typed = Request(model_name="gan", id="fuzz")
    typed.inputs.add(name="class_id", datatype="INT64", shape=[2]).contents.int64_contents.extend([7, 9])
    typed.parameters["latency_slo_ms"].int64_param = FUZZ_SLO_MS
    raw = Request(model_name="vae")
    raw.inputs.add(name="class_id", datatype="INT64", shape=[2])
    raw.inputs.add(name="seed", datatype="INT64", shape=[2])
    raw.raw_input_contents.extend([(3).to_bytes(8, "little") * 2, (5).to_bytes(8, "little") * 2])
    raw.outputs.add(name="image")
    diffusion = Request(model_name="diffusion")
    diffusion.inputs.add(name="class_id", datatype="INT64", shape=[1]).contents.int64_contents.append(1)
    diffusion.parameters["steps"].int64_param = 2
    diffusion.parameters["guidance_scale"].double_param = 2.0
    diffusion.parameters["latency_slo_ms"].double_param = float(FUZZ_SLO_MS)
    return [m.SerializeToString() for m in (typed, raw, diffusion)]


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One of: bytes flipped, cut short, extended, inserted, a slice repeated, or bytes at random."""
    b = bytearray(data)
    kind = rng.randrange(6)
    if kind == 0:
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif kind == 1:
        del b[rng.randrange(len(b)):]
    elif kind == 2:
        b += rng.randbytes(rng.randint(1, 64))
    elif kind == 3:
        at = rng.randrange(len(b) + 1)
        b[at:at] = rng.randbytes(rng.randint(1, 16))
    elif kind == 4:
        start = rng.randrange(len(b))
        b[start:start] = b[start:start + rng.randint(1, 32)]
    else:
        b = bytearray(rng.randbytes(rng.randint(0, 256)))
    return bytes(b)


def test_grpc_model_infer_answers_mutated_bytes_with_status_codes(server):
    messages = own_messages()
    valid = _valid_requests(messages["ModelInferRequest"])
    assert server["config"]["grpc_options"]["grpc_servicer_functions"] == [TOLERANT_REGISTRATION]
    rng, codes = random.Random(13), Counter()
    with grpc.insecure_channel(server["grpc"]) as channel:
        rpc = channel.unary_unary(MODEL_INFER)   # bytes in, bytes out
        for _ in range(budget(150)):
            data = mutate(rng.choice(valid), rng)
            try:
                rpc(data, timeout=30)
                codes["OK"] += 1
                continue
            except grpc.RpcError as err:
                code, details = err.code(), err.details() or ""
            codes[code.name] += 1
            assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (data, details)
            assert details and not leaks(details), (data, details)
        for data in valid:   # and it still serves
            response = messages["ModelInferResponse"].FromString(rpc(data, timeout=60))
            assert len(response.raw_output_contents[0]) == 28 * 28 * response.outputs[0].shape[0]
    print(f"gRPC ModelInfer fuzz: {dict(codes)}")
    assert codes["INVALID_ARGUMENT"] and codes["NOT_FOUND"]


# ---- HTTP below the app: the request line and headers --------------------------------------------------------

def exchange(url: str, data: bytes, wait_s: float = 1.5) -> tuple[bytes, bool]:
    """Send raw bytes on a new connection and read the answer: (what came back, whether the server closed the
    connection). Reading stops at the close, at the end of a first response with a Content-Length, or after
    wait_s without a byte (a server still waiting for the rest of a request it was promised)."""
    u = urllib.parse.urlsplit(url)
    received, closed = b"", False
    with socket.create_connection((u.hostname, u.port), timeout=wait_s) as s:
        try:
            s.sendall(data)
            while not _complete(received):
                piece = s.recv(65536)
                if not piece:
                    closed = True
                    break
                received += piece
        except TimeoutError:
            pass
        except (ConnectionResetError, BrokenPipeError):
            closed = True
    return received, closed


def _complete(answer: bytes) -> bool:
    head, sep, body = answer.partition(b"\r\n\r\n")
    lengths = [line.split(b":", 1)[1] for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
    return bool(sep) and bool(lengths) and len(body) >= int(lengths[0])


def status_of(answer: bytes) -> int | None:
    """The first response's status; None when nothing came back."""
    if not answer:
        return None
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer[9:12])


_JSON = b"Content-Type: application/json\r\n"
_BODY = b'{"model": "gan", "latency_slo_ms": 2000}'


def _post(headers: bytes, body: bytes) -> bytes:
    """A generation request with these framing headers and this body, as bytes."""
    return b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n" + _JSON + headers + b"\r\n" + body


MALFORMED = {
    "a method with a space": b"GE T /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n",
    "control bytes for a method": b"\x00\x01\x02 /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n",
    "a 70 KB method": b"A" * 70_000 + b" / HTTP/1.1\r\nHost: x\r\n\r\n",
    "a 100 KB path": b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "HTTP/9.9": b"GET /v2/health/live HTTP/9.9\r\nHost: x\r\n\r\n",
    "HTTP/1.1x": b"GET /v2/health/live HTTP/1.1x\r\nHost: x\r\n\r\n",
    "a lone method": b"GET\r\n\r\n",
    "NUL in a header name": b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-\x00: y\r\n\r\n",
    "a space in a header name": b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n",
    "a header without a colon": b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n",
    "NUL in a header value": b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",
    "a folded header": b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
    "a 100 KB header": b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 100_000 + b"\r\n\r\n",
    "10000 headers": b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 10_000 + b"\r\n",
    "two Host headers": b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
    "no Host header": b"GET /v2/health/live HTTP/1.1\r\n\r\n",
    "Content-Length -1": _post(b"Content-Length: -1\r\n", _BODY),
    "Content-Length abc": _post(b"Content-Length: abc\r\n", _BODY),
    "Content-Length 1, 2": _post(b"Content-Length: 1, 2\r\n", _BODY),
    "two Content-Lengths": _post(b"Content-Length: 5\r\nContent-Length: 9\r\n", _BODY),
    "a 30-digit Content-Length": _post(b"Content-Length: " + b"9" * 30 + b"\r\n", _BODY),
    "Content-Length and chunked": _post(b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
                                        b"4\r\nabcd\r\n0\r\n\r\n"),
    "Transfer-Encoding gzip": _post(b"Transfer-Encoding: gzip\r\n", _BODY),
    "Transfer-Encoding chunked, chunked": _post(b"Transfer-Encoding: chunked, chunked\r\n",
                                                b"4\r\nabcd\r\n0\r\n\r\n"),
    "a chunk size not in hex": _post(b"Transfer-Encoding: chunked\r\n", b"zz\r\nabcd\r\n0\r\n\r\n"),
    "a chunk size of 2**68": _post(b"Transfer-Encoding: chunked\r\n", b"fffffffffffffffff\r\nabcd\r\n0\r\n\r\n"),
    "a chunk without its CRLF": _post(b"Transfer-Encoding: chunked\r\n", b"4\r\nabcdefgh0\r\n\r\n"),
}
_V2_BODY = b'{"inputs": [{"name": "class_id", "datatype": "INT64", "shape": [1], "data": [3]}]}'
VALID = [b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
         b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + _JSON
         + b"Content-Length: %d\r\n\r\n" % len(_BODY) + _BODY,
         b"POST /v2/models/vae/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
         % len(_V2_BODY) + _V2_BODY]


def test_http_request_line_and_header_fuzz(server):
    """Malformed requests get a 4xx or a closed connection; mutations of valid ones get no 5xx; and the
    server serves a normal request afterwards."""
    url = server["url"]
    for data in VALID:
        assert status_of(exchange(url, data, wait_s=60)[0]) == 200
    for name, data in MALFORMED.items():
        answer, closed = exchange(url, data, wait_s=30)   # the app's own refusals take a hop to its replica
        status = status_of(answer)
        assert (closed if status is None else 400 <= status < 500), (name, answer[:300])
    rng, statuses = random.Random(7), Counter()
    mutants = [mutate(rng.choice(VALID), rng) for _ in range(budget(120))]
    # a mutant the server waits on for more bytes costs exchange()'s wait: many at once
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda data: exchange(url, data)[0], mutants))
    for data, answer in zip(mutants, answers):
        status = status_of(answer)
        statuses[status] += 1
        assert status is None or status < 500, (data, answer[:300])
        assert not leaks(answer.decode("latin-1")), (data, answer[:300])
    print(f"HTTP fuzz: {dict(statuses)}")
    assert http_json("GET", url + "/v2/health/live")[0] == 200
    status, body = http_json("POST", url + "/v1/images/generations", {"model": "gan", "prompt": "bag", "seed": 1})
    assert status == 200 and len(body["data"]) == 1
