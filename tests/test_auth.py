"""The optional API key (serving/api/auth.py): the check alone, then end to end. The session's app
(tests/conftest.py) runs without a key, and a replica's environment is fixed when it starts, so the module
deploys a second application beside it: the same Ingress class, with GENSERVE_API_KEY in its replica's
environment, under the route prefix /secure (gRPC: the application "secure"), in front of the session app's
model deployments. Every API route there needs the key — checked with the real openai client, tritonclient
over gRPC and raw HTTP — and the health routes do not."""
from __future__ import annotations

import secrets

import grpc
import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from serving.api.auth import API_KEY_ENV, OPEN_RPCS, check_authorization, is_open
from serving.api.errors import APIError
from serving.config import AppArgs
from tests.helpers import APP
from tests.test_edge_limits import b64, leaks, send, GOOD_PNG

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's, not ours
KEY = f"gs-{secrets.token_urlsafe(24)}"
SECURE = "secure"             # the second application's name, and its route prefix
BEARER = {"authorization": f"Bearer {KEY}"}


# ---- the check alone -------------------------------------------------------------------------------------

def test_without_a_key_nothing_is_checked(monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    check_authorization(None)
    monkeypatch.setenv(API_KEY_ENV, "")   # empty is unset
    check_authorization("Bearer anything")


def test_the_key_is_a_bearer_token(monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "k3y")
    check_authorization("Bearer k3y")
    check_authorization("bearer k3y")     # the scheme is case-insensitive (RFC 7235)
    for header, code in [(None, "missing_api_key"), ("", "missing_api_key")] + [
            (wrong, "invalid_api_key") for wrong in ("Bearer k3", "Bearer k3y2", "Basic k3y", "k3y", "Bearer",
                                                     "Bearer K3Y")]:
        with pytest.raises(APIError) as info:
            check_authorization(header)
        assert (info.value.status, info.value.code, info.value.type) == (401, code, "invalid_request_error"), header
        assert info.value.headers() == {"WWW-Authenticate": "Bearer"} and "k3y" not in info.value.message


def test_only_health_and_static_documents_are_open():
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/gan/ready", "/v2/models/gan/versions/1/ready",
                 "/", "/openapi.json", "/playground/app.js"):
        assert is_open(path), path
    for path in ("/v1/models", "/v1/models/gan", "/v1/images/generations", "/v1/likelihood", "/v2",
                 "/v2/models/gan", "/v2/models/gan/infer", "/v2/models/gan/config", "/v2/models/stats",
                 "/v2/health/live/x", "/v2/models/gan/ready/x", "/v2/health", "/nope", "//v2/health/live"):
        assert not is_open(path), path
    assert OPEN_RPCS == {"ServerLive", "ServerReady", "ModelReady"}


# ---- a second application, with the key --------------------------------------------------------------------

@pytest.fixture(scope="module")
def secure(server, served_store) -> str:
    """The /secure application's HTTP root; removed when the module ends."""
    from ray import serve

    from serving.api.ingress import Ingress

    args = AppArgs.from_dict(server["config"]["applications"][0]["args"])
    models = {m.name: serve.get_deployment_handle(m.name, app_name=APP) for m in args.models}
    manifests = {m.name: served_store.manifest(m.ref) for m in args.models}
    ingress = Ingress.options(name="SecureIngress", ray_actor_options={
        "num_cpus": 0, "runtime_env": {"env_vars": {API_KEY_ENV: KEY}}})
    serve.run(ingress.bind(models, manifests, args.ingress_timeout_s), name=SECURE, route_prefix=f"/{SECURE}")
    try:
        yield f"{server['url']}/{SECURE}"
    finally:
        serve.delete(SECURE)


def test_the_openai_client_needs_the_key(secure):
    for wrong in ("wrong", KEY[:-1], KEY + "x"):
        client = openai.OpenAI(base_url=secure + "/v1", api_key=wrong, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            client.images.generate(model="gan", prompt="bag")
        assert (info.value.status_code, info.value.code) == (401, "invalid_api_key")
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
    client = openai.OpenAI(base_url=secure + "/v1", api_key=KEY, max_retries=0)
    response = client.images.generate(model="gan", prompt="bag", n=2, extra_body={"seed": 1})
    assert len(response.data) == 2 and response.model_extra["class_name"] == "Bag"
    assert {m.id for m in client.models.list()} == {"gan", "vae", "flow", "diffusion", "pixelcnn"}


# every protected route, with a body it would otherwise take
ROUTES = [("GET", "/v1/models", None), ("GET", "/v1/models/gan", None),
          ("POST", "/v1/images/generations", {"model": "gan", "prompt": "bag"}),
          ("POST", "/v1/images/interpolations", {"seeds": [1, 2], "frames": 2}),
          ("POST", "/v1/images/reconstructions", {"images": [b64(GOOD_PNG)]}),
          ("POST", "/v1/likelihood", {"model": "flow", "images": [b64(GOOD_PNG)]}),
          ("GET", "/v2", None), ("GET", "/v2/models/gan", None), ("GET", "/v2/models/gan/config", None),
          ("GET", "/v2/models/gan/stats", None), ("GET", "/v2/models/stats", None),
          ("POST", "/v2/models/gan/infer",
           {"inputs": [{"name": "class_id", "datatype": "INT64", "shape": [1], "data": [8]}]})]


def test_every_api_route_needs_the_key_over_http(secure):
    for method, path, body in ROUTES:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {KEY}"}):
            answer = send(secure, method, f"/{SECURE}{path}", body, headers)
            assert answer.status == 401, (path, headers, answer.body[:200])
            assert answer.headers["www-authenticate"] == "Bearer"
            error = answer.json()["error"]
            if path.startswith("/v2"):
                assert isinstance(error, str), path                 # KServe v2's shape
            else:
                assert (error["type"], error["code"]) in {("invalid_request_error", "invalid_api_key"),
                                                          ("invalid_request_error", "missing_api_key")}, path
            assert KEY not in answer.body.decode() and not leaks(answer.body.decode())
        answer = send(secure, method, f"/{SECURE}{path}", body, BEARER)
        assert answer.status == 200, (path, answer.body[:300])


def test_health_routes_and_static_documents_stay_open(secure, server):
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/gan/ready", "/", "/openapi.json"):
        assert send(secure, "GET", f"/{SECURE}{path}").status == 200, path
    assert send(server["url"], "GET", "/-/healthz").status == 200   # Serve's own, outside the app
    spec = send(secure, "GET", f"/{SECURE}/openapi.json").json()   # and the document says which need the key
    scheme = spec["components"]["securitySchemes"]["bearer"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    infer = spec["paths"]["/v2/models/{model}/infer"]["post"]
    assert infer["security"] == [{"bearer": []}] and "401" in infer["responses"]
    assert "security" not in spec["paths"]["/v2/health/ready"]["get"]
    # the session's app, started without a key, neither asks for one nor documents one
    plain = send(server["url"], "GET", "/openapi.json").json()
    assert "securitySchemes" not in plain["components"] and send(server["url"], "GET", "/v1/models").status == 200


def test_grpc_needs_the_key_but_for_health(secure, server):
    client = grpcclient.InferenceServerClient(server["grpc"])
    app = {"application": SECURE}
    class_id = grpcclient.InferInput("class_id", [1], "INT64")
    class_id.set_data_from_numpy(np.array([8], np.int64))
    try:
        for headers in (app, {**app, "authorization": "Bearer wrong"}):
            for call in (lambda: client.infer("gan", [class_id], headers=headers),
                         lambda: client.get_model_metadata("gan", headers=headers),
                         lambda: client.get_server_metadata(headers=headers)):
                with pytest.raises(InferenceServerException) as info:
                    call()
                assert info.value.status() == str(grpc.StatusCode.UNAUTHENTICATED), info.value
                assert not leaks(info.value.message())
        assert client.is_server_live(headers=app) and client.is_model_ready("gan", headers=app)
        images = client.infer("gan", [class_id], headers={**app, **BEARER}).as_numpy("image")
        assert images.shape == (1, 28, 28)
    finally:
        client.close()
