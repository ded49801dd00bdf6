"""Input limits at the edge, against the session's app (tests/conftest.py): every hostile input of the README's
"Limits at the edge" sent over each protocol — OpenAI's API and the families' operations as raw HTTP and with the real `openai`
client, KServe v2 over HTTP as raw bytes and with tritonclient.http, KServe v2 over gRPC with genserve's own
messages on a raw channel and with tritonclient.grpc — gets a 4xx in that API's shape (gRPC: its status
code), whose OpenAI `type` matches the status; none gets a 5xx, and no answer carries a traceback, a host path
or a library version. Plus that table against the constants, and the JSON decoder alone."""
from __future__ import annotations

import ast
import base64
import http.client
import json
import re
import struct
import time
import urllib.parse
import zlib
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import grpc
import numpy as np
import openai
import platform
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from serving.api import errors, png, validation
from serving.api.errors import APIError, error_type
from serving.api.http import decode_json, json_depth
from serving.api.png import encode_png
from serving.api.validation import MAX_BODY_BYTES, MAX_JSON_DEPTH, MAX_PNG_BYTES
from tests.helpers import http_json

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's, not ours
ROOT = Path(__file__).resolve().parents[1]
LIMITS_DOC = ROOT / "README.md"   # its "Limits at the edge" table


# ---- what an answer must never carry ----------------------------------------------------------------------

# Versions of what serves the app; the metadata endpoints publish genserve's own on purpose, errors none
_LIBRARIES = ("ray", "fastapi", "starlette", "uvicorn", "pydantic", "numpy", "pillow", "grpcio", "protobuf",
              "onnxruntime", "h11", "torch")
VERSIONS = sorted({version(name) for name in _LIBRARIES} | {platform.python_version()})
LEAK_MARKERS = ("Traceback", 'File "', "/work/", "/tmp/", "/home/", "/usr/", "site-packages", ".py:", ".py\"")


def leaks(text: str) -> list[str]:
    """What of a stack trace, a host path or a library version `text` carries."""
    return [m for m in LEAK_MARKERS if m in text] + [f"version {v}" for v in VERSIONS if v in text]


# ---- raw HTTP ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]    # names in lower case
    body: bytes

    def json(self):
        return json.loads(self.body)


def send(url: str, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None,
         chunked: bool = False) -> Answer:
    """One request on its own connection, exactly as given (chunked: Transfer-Encoding, no Content-Length)."""
    u = urllib.parse.urlsplit(url)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    try:
        all_headers = {"content-type": "application/json", **(headers or {})}
        if chunked:
            pieces = [data[i:i + 65536] for i in range(0, len(data), 65536)]
            conn.request(method, path, body=iter(pieces), headers=all_headers, encode_chunked=True)
        else:
            conn.request(method, path, body=data, headers=all_headers)
        response = conn.getresponse()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        conn.close()


def chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def png_bytes(w: int = 28, h: int = 28, raw: bytes | None = None, depth: int = 8, color: int = 0) -> bytes:
    """A PNG built by hand (any header, any image data), for what encode_png will not write."""
    row = w * depth // 8 * {0: 1, 2: 3}[color]
    raw = b"".join(b"\0" + bytes(row) for _ in range(h)) if raw is None else raw
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


GOOD_PNG = encode_png(np.zeros((28, 28), np.uint8))


# ---- the hostile requests --------------------------------------------------------------------------------

G, I, R, L = "/v1/images/generations", "/v1/images/interpolations", "/v1/images/reconstructions", "/v1/likelihood"
V = "/v2/models/gan/infer"
HEADER = "Inference-Header-Content-Length"


@dataclass(frozen=True)
class Hostile:
    name: str
    path: str
    body: bytes | dict
    status: int
    param: str | None = None                       # OpenAI's error `param`, where one is at fault
    code: str | None = None                        # OpenAI's error `code`, where it matters
    headers: dict = field(default_factory=dict)
    chunked: bool = False
    method: str = "POST"


def _nested(depth: int) -> bytes:
    """A generation body whose ignored `user` field takes the whole body to `depth` levels."""
    return b'{"model": "gan", "user": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


def _class_ids(shape, data, **extra) -> dict:
    return {"inputs": [{"name": "class_id", "datatype": "INT64", "shape": shape, "data": data, **extra}]}


def _binary(name: str, payload: bytes, *, shape=(2,), declared: int | None = None, header: str | None = None,
            after: bytes = b"") -> Hostile:
    """A v2 request with the binary tensor extension that should be refused: class_id of `shape` declared
    with binary_data_size `declared` (default: the payload's size), `after` appended to the body, and
    Inference-Header-Content-Length `header` (default: the JSON part's length)."""
    head = json.dumps({"inputs": [{"name": "class_id", "datatype": "INT64", "shape": list(shape), "parameters": {
        "binary_data_size": len(payload) if declared is None else declared}}]}).encode()
    return Hostile(name, V, head + payload + after, 400, headers={HEADER: str(len(head)) if header is None else header})


_BIG = b'{"model": "gan", "user": "' + b"x" * MAX_BODY_BYTES + b'"}'
_IDS = np.array([1, 2], "<i8").tobytes()

OPENAI_CASES = [
    Hostile("headers over the limit", G, {"model": "gan"}, 431, code="headers_too_large",
            headers={"x-padding": "x" * validation.MAX_HEADER_BYTES}),
    Hostile("a query over the limit", "/v1/models?" + "q" * validation.MAX_URL_BYTES, b"", 414, code="uri_too_long",
            method="GET"),
    Hostile("body over the limit", G, _BIG, 413, code="body_too_large"),
    Hostile("chunked body over the limit", G, _BIG, 413, code="body_too_large", chunked=True),
    Hostile("not JSON", G, b'{"model": "gan",', 400, code="invalid_json"),
    Hostile("not UTF-8", G, b'{"prompt": "\xff\xfe"}', 400, code="invalid_json"),
    Hostile("not an object", G, b"[1, 2]", 400),
    Hostile("nested 10000 deep", G, b"[" * 10000 + b"]" * 10000, 400, code="invalid_json"),
    Hostile("nested one level too deep", G, _nested(MAX_JSON_DEPTH + 1), 400, code="invalid_json"),
    Hostile("NaN", G, b'{"model": "gan", "user": NaN}', 400, code="invalid_json"),
    Hostile("Infinity", G, b'{"model": "diffusion", "guidance_scale": Infinity}', 400, code="invalid_json"),
    Hostile("-Infinity", G, b'{"model": "gan", "latency_slo_ms": -Infinity}', 400, code="invalid_json"),
    Hostile("duplicate keys", G, b'{"model": "gan", "model": "vae"}', 400, code="invalid_json"),
    Hostile("lone surrogate", G, b'{"model": "gan", "prompt": "\\ud800"}', 400, code="invalid_json"),
    Hostile("lone surrogate in a key", G, b'{"\\udfff": 1}', 400, code="invalid_json"),
    Hostile("a 5000-digit integer", G, b'{"model": "gan", "seed": ' + b"9" * 5000 + b"}", 400, code="invalid_json"),
    Hostile("unknown field", G, {"model": "gan", "colour": "red"}, 400, "colour", "unknown_parameter"),
    Hostile("n as a string", G, {"model": "gan", "n": "2"}, 400, "n"),
    Hostile("n as a bool", G, {"model": "gan", "n": True}, 400, "n"),
    Hostile("n as a float", G, {"model": "gan", "n": 2.0}, 400, "n"),
    Hostile("n = 0", G, {"model": "gan", "n": 0}, 400, "n"),
    Hostile("n = 17", G, {"model": "gan", "n": validation.MAX_N + 1}, 400, "n"),
    Hostile("seed as a string", G, {"model": "gan", "seed": "1"}, 400, "seed"),
    Hostile("seed < 0", G, {"model": "gan", "seed": -1}, 400, "seed"),
    Hostile("seed = 2**64", G, {"model": "gan", "seed": 2**64}, 400, "seed"),
    Hostile("steps = 0", G, {"model": "diffusion", "steps": 0}, 400, "steps"),
    Hostile("steps = 1001", G, {"model": "diffusion", "steps": validation.MAX_STEPS + 1}, 400, "steps"),
    Hostile("steps as a float", G, {"model": "diffusion", "steps": 1.5}, 400, "steps"),
    Hostile("guidance_scale < 0", G, {"model": "diffusion", "guidance_scale": -0.5}, 400, "guidance_scale"),
    Hostile("guidance_scale over the limit", G, {"model": "diffusion", "guidance_scale": 20.5}, 400, "guidance_scale"),
    Hostile("guidance_scale, 400 digits", G, b'{"model": "diffusion", "guidance_scale": ' + b"9" * 400 + b"}",
            400, "guidance_scale"),
    Hostile("latency_slo_ms = 0", G, {"model": "gan", "latency_slo_ms": 0}, 400, "latency_slo_ms"),
    Hostile("latency_slo_ms over the limit", G, {"model": "gan", "latency_slo_ms": 600_001}, 400, "latency_slo_ms"),
    Hostile("latency_slo_ms, 400 digits", G, b'{"model": "gan", "latency_slo_ms": ' + b"9" * 400 + b"}",
            400, "latency_slo_ms"),
    Hostile("best_effort as a string", G, {"model": "gan", "best_effort": "yes"}, 400, "best_effort"),
    Hostile("response_format 0", G, {"model": "gan", "response_format": 0}, 400, "response_format"),
    Hostile("size 27x27", G, {"model": "gan", "size": "27x27"}, 400, "size"),
    Hostile("size not square", G, {"model": "gan", "size": "28x56"}, 400, "size"),
    Hostile("size over the limit", G, {"model": "gan", "size": "476x476"}, 400, "size"),
    Hostile("size in superscript digits", G, {"model": "gan", "size": "²x²"}, 400, "size"),
    Hostile("size as a number", G, {"model": "gan", "size": 28}, 400, "size"),
    Hostile("unknown model", G, {"model": "nope"}, 404, "model", "model_not_found"),
    Hostile("model ../x", G, {"model": "../x"}, 404, "model", "model_not_found"),
    Hostile("model as a list", G, {"model": ["gan"]}, 400, "model"),
    Hostile("model ../x in the path", "/v1/models/..%2Fx", b"", 404, method="GET"),
    Hostile("prompt as a number", G, {"model": "gan", "prompt": 5}, 400, "prompt"),
    Hostile("a megabyte prompt", G, {"model": "gan", "prompt": "x" * 1_000_000}, 400, "prompt"),
    Hostile("a NUL in the prompt", G, {"model": "gan", "prompt": "\0sneaker"}, 400, "prompt"),
    Hostile("an escape sequence in the prompt", G, {"model": "gan", "prompt": "\x1b[31mbag"}, 400, "prompt"),
    # the families' operations: the same decoder, and the uploads
    Hostile("likelihood: NaN", L, b'{"model": "flow", "images": [], "seed": NaN}', 400, code="invalid_json"),
    Hostile("interpolation: duplicate keys", I, b'{"seeds": [1, 2], "seeds": [3, 4]}', 400, code="invalid_json"),
    Hostile("reconstruction: over the limit", R, _BIG, 413, code="body_too_large"),
    Hostile("not base64", L, {"model": "flow", "images": ["%%%"]}, 400, "images[0]"),
    Hostile("not a PNG", L, {"model": "flow", "images": [b64(b"GIF89a" + bytes(64))]}, 400, "images[0]"),
    Hostile("PNG 29x29", L, {"model": "flow", "images": [b64(png_bytes(29, 29))]}, 400, "images[0]"),
    Hostile("PNG 100000x100000 in its header", L, {"model": "flow", "images": [b64(png_bytes(100_000, 100_000,
                                                                                            bytes(64)))]},
            400, "images[0]"),
    Hostile("PNG in color", L, {"model": "flow", "images": [b64(png_bytes(color=2))]}, 400, "images[0]"),
    Hostile("PNG of 16 bits", L, {"model": "flow", "images": [b64(png_bytes(depth=16))]}, 400, "images[0]"),
    Hostile("PNG cut short", L, {"model": "flow", "images": [b64(GOOD_PNG[:50])]}, 400, "images[0]"),
    Hostile("PNG with a bad CRC", L, {"model": "flow", "images": [b64(GOOD_PNG[:-16] + bytes(4) + GOOD_PNG[-12:])]},
            400, "images[0]"),   # IDAT's CRC; IEND's (it has no data) is never read
    Hostile("PNG over the size limit", L, {"model": "flow", "images": [b64(GOOD_PNG + bytes(MAX_PNG_BYTES))]},
            400, "images[0]"),
    Hostile("65 images", L, {"model": "flow", "images": [b64(GOOD_PNG)] * (validation.MAX_IMAGES + 1)}, 400, "images"),
    Hostile("an image of the wrong type", R, {"images": [7]}, 400, "images[0]"),
    Hostile("pixels out of range", R, {"images": [[[256] * 28] * 28]}, 400, "images[0]"),
    Hostile("seeds over the limit", I, {"seeds": [1, 2**64]}, 400, "seeds"),
    Hostile("frames over the limit", I, {"seeds": [1, 2], "frames": validation.MAX_FRAMES + 1}, 400, "frames"),
    Hostile("likelihood on a GAN", L, {"model": "gan", "images": [b64(GOOD_PNG)]}, 400, "model",
            "unsupported_operation"),
]

V2_CASES = [
    Hostile("v2: headers over the limit", V, _class_ids([1], [1]), 431,
            headers={f"x-{i}": "x" * 1000 for i in range(40)}),
    Hostile("v2: body over the limit", V, _BIG, 413),
    Hostile("v2: chunked body over the limit", V, _BIG, 413, chunked=True),
    Hostile("v2: not JSON", V, b'{"inputs": [', 400),
    Hostile("v2: nested 10000 deep", V, b"[" * 10000 + b"]" * 10000, 400),
    Hostile("v2: NaN", V, b'{"inputs": [], "parameters": {"max_fd": NaN}}', 400),
    Hostile("v2: duplicate keys", V, b'{"inputs": [], "inputs": []}', 400),
    Hostile("v2: lone surrogate in the id", V, b'{"id": "\\ud800", "inputs": []}', 400),
    Hostile("v2: id as a number", V, {"id": 5, **_class_ids([1], [1])}, 400),
    Hostile("v2: shape [2], 1 value", V, _class_ids([2], [1]), 400),
    Hostile("v2: 17 images", V, _class_ids([17], [1] * 17), 400),
    Hostile("v2: shape [0]", V, _class_ids([0], []), 400),
    Hostile("v2: shape [2, 1]", V, _class_ids([2, 1], [[1], [2]]), 400),
    Hostile("v2: shape as a string", V, _class_ids("2", [1, 2]), 400),
    Hostile("v2: FP32", V, {"inputs": [{"name": "class_id", "datatype": "FP32", "shape": [1], "data": [1.0]}]}, 400),
    Hostile("v2: a float value", V, _class_ids([1], [1.5]), 400),
    Hostile("v2: class_id 11", V, _class_ids([1], [11]), 400),
    Hostile("v2: seed -1", V, {"inputs": [*_class_ids([1], [1])["inputs"],
                                          {"name": "seed", "datatype": "INT64", "shape": [1], "data": [-1]}]}, 400),
    Hostile("v2: an input named by an object", V, {"inputs": [{"name": {}, "datatype": "INT64", "shape": [1],
                                                               "data": [1]}]}, 400),
    Hostile("v2: an output named by an object", V, {**_class_ids([1], [1]), "outputs": [{"name": {}}]}, 400),
    Hostile("v2: timeout over the limit", V, {**_class_ids([1], [1]), "parameters": {"timeout": 10**400}}, 400),
    Hostile("v2: guidance_scale over the limit", "/v2/models/diffusion/infer",
            {**_class_ids([1], [1]), "parameters": {"guidance_scale": 21}}, 400),
    _binary("v2: binary, 8 bytes for shape [2]", _IDS[:8]),
    _binary("v2: binary, size larger than the bytes", _IDS, declared=24),
    _binary("v2: binary, bytes left over", _IDS, after=b"\0"),
    _binary("v2: header length past the body", _IDS, header="100000"),
    _binary("v2: header length not a number", _IDS, header="12a"),
    _binary("v2: header length in superscript digits", _IDS, header="²"),
    Hostile("v2: unknown model", "/v2/models/nope/infer", _class_ids([1], [1]), 404),
    Hostile("v2: model ../x", "/v2/models/..%2Fx/infer", _class_ids([1], [1]), 404),
    Hostile("v2: unknown version", "/v2/models/gan/versions/999/infer", _class_ids([1], [1]), 404),
    Hostile("v2: metadata of ../x", "/v2/models/..%2Fx", b"", 404, method="GET"),
]


@pytest.fixture(scope="module")
def answers(server) -> dict[str, Answer]:
    """Every hostile request's answer, each sent once."""
    return {case.name: send(server["url"], case.method, case.path, case.body, case.headers, case.chunked)
            for case in OPENAI_CASES + V2_CASES}


# ---- the table and the constants -------------------------------------------------------------------------

def test_the_limits_table_is_the_constants():
    """Each row of the README's "Limits at the edge" table that names a constant gives that constant's value as
    its default."""
    rows = re.findall(r"^\| (.+?) \| `(\w+)`(?: \(`([\w/.]+)`\))? \| ([\d.]+) \|", LIMITS_DOC.read_text(), re.M)
    modules = {"serving/api/validation.py": validation, "serving/api/errors.py": errors, "serving/api/png.py": png}
    assert len(rows) >= 15
    for what, name, where, default in rows:
        module = modules[where] if where else next(m for m in modules.values() if hasattr(m, name))
        assert (int(default) if default.isdigit() else float(default)) == getattr(module, name), (what, name)
    named = {name for _, name, _, _ in rows}
    assert {"MAX_BODY_BYTES", "MAX_JSON_DEPTH", "MAX_N", "MAX_STEPS", "MAX_GUIDANCE_SCALE", "MAX_SEED",
            "MAX_LATENCY_SLO_MS", "MAX_UPSCALE", "MAX_PROMPT_CHARS", "MAX_IMAGES", "MAX_PNG_BYTES"} <= named


def test_the_json_decoder_refuses_what_no_client_means():
    assert decode_json(b'{"a": [1, {"b": "\\ud83d\\ude00"}]}') == {"a": [1, {"b": "\U0001F600"}]}  # a pair is fine
    for body, message in [(b"[" * 100_000, "nests 100000 deep"), (b'{"a": NaN}', "NaN"), (b"[Infinity]", "Infinity"),
                          (b'{"a": 1, "b": {"c": 1, "c": 2}}', "'c' twice"), (b'["\\udc00"]', "lone UTF-16"),
                          (b'{"a": 1', "not valid JSON"), (b"\xff", "not valid JSON")]:
        with pytest.raises(APIError, match=message) as info:
            decode_json(body)
        assert (info.value.status, info.value.code) == (400, "invalid_json")
    # brackets inside strings do not count; the count is exact
    assert json_depth(b'{"a": "' + b"[" * 100 + b'", "b": [[[]]]}') == 4
    assert json_depth(b"[" * 40 + b"]" * 40) == 40


def test_the_error_type_follows_the_status():
    types = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             413: "invalid_request_error", 414: "invalid_request_error", 431: "invalid_request_error",
             429: "rate_limit_error", 500: "server_error", 503: "server_error", 504: "timeout_error"}
    for status, expected in types.items():
        assert APIError(status, "m").type == error_type(status) == expected, status
    grpc_codes = {401: "UNAUTHENTICATED", 413: "RESOURCE_EXHAUSTED", 429: "RESOURCE_EXHAUSTED", 400: "INVALID_ARGUMENT"}
    for status, expected in grpc_codes.items():
        assert APIError(status, "m").grpc_status() == expected, status


def test_error_messages_are_short_and_utf8():
    err = APIError(400, "x" * 10_000 + "\ud800", param="\udfff")
    assert len(err.message) == errors.MAX_MESSAGE_CHARS and err.message.endswith("(cut short)")
    assert json.dumps(err.body(), ensure_ascii=False).encode("utf-8")   # no lone surrogate left to fail on
    assert APIError(401, "m").headers() == {"WWW-Authenticate": "Bearer"}


# ---- over raw HTTP -----------------------------------------------------------------------------------------

def test_openai_and_family_routes_refuse_hostile_input_in_openai_shape(answers):
    for case in OPENAI_CASES:
        answer = answers[case.name]
        assert answer.status == case.status, (case.name, answer.body[:300])
        error = answer.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, case.name
        assert error["type"] == error_type(case.status), case.name   # the type follows the status
        if case.param is not None:
            assert error["param"] == case.param, (case.name, error)
        if case.code is not None:
            assert error["code"] == case.code, (case.name, error)
        assert len(error["message"]) <= errors.MAX_MESSAGE_CHARS


def test_v2_refuses_hostile_input_in_kserve_shape(answers):
    for case in V2_CASES:
        answer = answers[case.name]
        assert answer.status == case.status, (case.name, answer.body[:300])
        body = answer.json()
        assert list(body) == ["error"] and isinstance(body["error"], str), case.name


def test_no_error_answer_leaks_a_trace_a_path_or_a_version(answers):
    for name, answer in answers.items():
        assert answer.status < 500, name
        text = answer.body.decode("utf-8") + "\n" + "\n".join(f"{k}: {v}" for k, v in answer.headers.items())
        assert not leaks(text), (name, leaks(text))
        assert answer.headers.get("server", "uvicorn") == "uvicorn", name   # no version in it


def test_the_limits_themselves_are_served(server):
    """Just inside each limit is served: a body nested exactly MAX_JSON_DEPTH deep, the largest size, a
    prompt of MAX_PROMPT_CHARS that names a class."""
    url = server["url"]
    assert send(url, "POST", G, _nested(MAX_JSON_DEPTH)).status == 200
    status, body = http_json("POST", url + G, {"model": "gan", "size": "448x448", "seed": 1,
                                               "prompt": ("bag " * 250)[:validation.MAX_PROMPT_CHARS]})
    assert status == 200 and body["class_name"] == "Bag"
    assert len(base64.b64decode(body["data"][0]["b64_json"])) > 0


def test_a_decompression_bomb_is_cheap(server):
    """A 28x28 PNG whose image data inflates to 60 MB, within the upload limit: its header passes, and
    decoding stops at the image's 784 pixels, so it costs what a normal upload does."""
    bomb = png_bytes(raw=b"".join(b"\0" + bytes(28) for _ in range(28)) + bytes(60_000_000))
    assert len(bomb) <= MAX_PNG_BYTES
    start = time.perf_counter()
    status, body = http_json("POST", server["url"] + L, {"model": "flow", "images": [b64(bomb)]})
    assert time.perf_counter() - start < 5
    assert status == 200, body   # the image's own pixels (all black); the data after them is never inflated


# ---- with the real clients ---------------------------------------------------------------------------------

def test_the_openai_client_gets_typed_errors(server):
    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0)
    cases = [(dict(model="gan", prompt="bag", n=17), openai.BadRequestError, "n"),
             (dict(model="nope", prompt="bag"), openai.NotFoundError, "model"),
             (dict(model="../x", prompt="bag"), openai.NotFoundError, "model"),
             (dict(model="gan", prompt="bag", size="27x27"), openai.BadRequestError, "size"),
             (dict(model="gan", prompt="x" * 1_000_000), openai.BadRequestError, "prompt"),
             (dict(model="gan", prompt="bag\x07"), openai.BadRequestError, "prompt"),
             (dict(model="diffusion", prompt="bag", extra_body={"steps": 1001}), openai.BadRequestError, "steps"),
             (dict(model="diffusion", prompt="bag", extra_body={"guidance_scale": 1e9}), openai.BadRequestError,
              "guidance_scale"),
             (dict(model="gan", prompt="bag", extra_body={"seed": 2**64}), openai.BadRequestError, "seed")]
    for kwargs, error, param in cases:
        with pytest.raises(error) as info:
            client.images.generate(**kwargs)
        assert (info.value.type, info.value.param) == ("invalid_request_error", param), kwargs
    with pytest.raises(openai.APIStatusError) as info:   # 413 has no class of its own in the client
        client.images.generate(model="gan", prompt="bag", extra_body={"user": "x" * MAX_BODY_BYTES})
    assert (info.value.status_code, info.value.code) == (413, "body_too_large")


def test_tritonclient_http_gets_4xx(server):
    client = httpclient.InferenceServerClient(server["url"].removeprefix("http://"))

    def status_of(model, tensors, **kwargs):
        with pytest.raises(InferenceServerException) as info:
            client.infer(model, tensors, **kwargs)
        assert not leaks(info.value.message())
        return info.value.status()

    def class_ids(values, binary=False):
        t = httpclient.InferInput("class_id", [len(values)], "INT64")
        t.set_data_from_numpy(np.array(values, np.int64), binary_data=binary)
        return t
    assert status_of("nope", [class_ids([1])]) == "404"
    assert status_of("../x", [class_ids([1])]) == "404"
    assert status_of("gan", [class_ids([1] * 17)]) == "400"
    assert status_of("gan", [class_ids([11])]) == "400"
    # the client writes NaN as JSON's Python dialect does; the server refuses it
    assert status_of("diffusion", [class_ids([1])], parameters={"guidance_scale": float("nan")}) == "400"
    short = class_ids([1, 2], binary=True)   # shape [2] declared with the 8 bytes of one value
    short._raw_data, short._parameters["binary_data_size"] = short._raw_data[:8], 8
    assert status_of("gan", [short]) == "400"


# ---- over gRPC ---------------------------------------------------------------------------------------------

def own_messages():
    """genserve's own messages (core/protos), in a descriptor pool of their own: tritonclient's generated
    `inference` package defines the same names in the default pool, which refuses them a second time."""
    from google.protobuf import descriptor_pool
    from google.protobuf.message_factory import GetMessageClass

    source = (ROOT / "core" / "protos" / "open_inference_pb2.py").read_text()
    call = next(node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)
                and getattr(node.func, "attr", "") == "AddSerializedFile")
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(ast.literal_eval(call.args[0]))
    return {name: GetMessageClass(pool.FindMessageTypeByName(f"inference.{name}"))
            for name in ("ModelInferRequest", "ModelInferResponse")}


@pytest.fixture(scope="module")
def model_infer(server):
    """ModelInfer on a raw channel with genserve's own messages: (request class, call(request) -> (code, details))."""
    messages = own_messages()
    with grpc.insecure_channel(server["grpc"]) as channel:
        rpc = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                  request_serializer=messages["ModelInferRequest"].SerializeToString,
                                  response_deserializer=messages["ModelInferResponse"].FromString)

        def call(request):
            try:
                rpc(request, timeout=60)
                return grpc.StatusCode.OK, ""
            except grpc.RpcError as err:
                return err.code(), err.details()
        yield messages["ModelInferRequest"], call


def test_grpc_refuses_hostile_input_with_status_codes(model_infer):
    Request, call = model_infer

    def request(model="gan", shape=(1,), values=(1,), raw=None, datatype="INT64", **parameters):
        r = Request(model_name=model)
        t = r.inputs.add(name="class_id", datatype=datatype, shape=list(shape))
        if raw is None:
            t.contents.int64_contents.extend(values)
        else:
            r.raw_input_contents.extend(raw)
        for key, value in parameters.items():
            setattr(r.parameters[key], {float: "double_param", int: "int64_param", str: "string_param"}[type(value)],
                    value)
        return r
    invalid, not_found = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    cases = {"unknown model": (request(model="nope"), not_found),
             "model ../x": (request(model="../x"), not_found),
             "raw bytes short of the shape": (request(shape=[2], raw=[_IDS[:12]]), invalid),
             "two raw entries for one input": (request(shape=[2], raw=[_IDS, _IDS]), invalid),
             "shape [0]": (request(shape=[0], values=[]), invalid),
             "17 images": (request(shape=[17], values=[1] * 17), invalid),
             "shape [2, 1]": (request(shape=[2, 1], values=[1, 2]), invalid),
             "FP32": (request(datatype="FP32"), invalid),
             "class_id 11": (request(values=[11]), invalid),
             "shape [2], 1 value": (request(shape=[2], values=[1]), invalid),
             "guidance_scale NaN": (request(model="diffusion", guidance_scale=float("nan")), invalid),
             "guidance_scale inf": (request(model="diffusion", guidance_scale=float("inf")), invalid),
             "latency_slo_ms < 0": (request(latency_slo_ms=-1), invalid),
             "steps as a string": (request(model="diffusion", steps="ten"), invalid),
             "an unknown parameter": (request(colour="red"), invalid),
             "a message over the body limit": (request(shape=[1], raw=[bytes(MAX_BODY_BYTES)]),
                                               grpc.StatusCode.RESOURCE_EXHAUSTED)}
    for name, (message, expected) in cases.items():
        code, details = call(message)
        assert code == expected, (name, code, details)
        assert details and not leaks(details), (name, details)


def test_tritonclient_grpc_gets_status_codes(server):
    client = grpcclient.InferenceServerClient(server["grpc"])

    def status_of(model, values, shape=None, **kwargs):
        t = grpcclient.InferInput("class_id", shape or [len(values)], "INT64")
        t.set_data_from_numpy(np.array(values, np.int64))
        with pytest.raises(InferenceServerException) as info:
            client.infer(model, [t], **kwargs)
        assert not leaks(info.value.message())
        return info.value.status()
    try:
        assert status_of("../x", [1]) == "StatusCode.NOT_FOUND"
        assert status_of("gan", [1] * 17) == "StatusCode.INVALID_ARGUMENT"
        assert status_of("diffusion", [1], parameters={"guidance_scale": float("nan")}) == "StatusCode.INVALID_ARGUMENT"
        assert status_of("gan", [1], parameters={"latency_slo_ms": 10**9}) == "StatusCode.INVALID_ARGUMENT"
        assert status_of("diffusion", [1], parameters={"steps": "ten"}) == "StatusCode.INVALID_ARGUMENT"
    finally:
        client.close()
