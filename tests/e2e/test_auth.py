"""API-key auth, deny by default: the matrix of keys, routes and path tricks, over real HTTP.

The server runs with two keys, docs disabled (so the docs paths are not public) and a root
path, and has INFERD_API_KEY set in its environment (the flag must win over it)."""
from __future__ import annotations

from http.client import HTTPConnection

import httpx
import openai
import pytest

KEYS = ["sk-alpha", "sk-beta"]
ENV_KEY = "sk-from-env"
UNAUTHORIZED = {"error": {"message": "Unauthorized", "type": "AuthenticationError", "param": None,
                          "code": 401}}
PUBLIC = [("GET", "/health"), ("GET", "/ping"), ("POST", "/ping"), ("GET", "/version"), ("GET", "/metrics")]
PROTECTED = [("GET", "/v1/models"), ("GET", "/load"), ("POST", "/tokenize"), ("POST", "/detokenize"),
             ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "/invocations"),
             ("POST", "/scale_elastic_ep"), ("POST", "/is_scaling_elastic_ep"), ("GET", "/no/such/route"),
             ("GET", "/docs"), ("GET", "/redoc"), ("GET", "/openapi.json"), ("GET", "/docs/oauth2-redirect")]
# Spellings that must never reach a protected handler without a key.
TRICKS = ["//v1/models", "/v1/models/", "/v1//models", "/V1/models", "/v1/MODELS", "/%2Fv1/models",
          "/v1%2Fmodels", "/prefix/v1/models", "/prefix//v1/models", "///v1/models/", "/HEALTH/../v1/models",
          "/health/../v1/models", "/v1/models?x=/health", "/v1/models#/health", "/v1/models;/health",
          "/prefix", "/prefixv1/models", "/health%2F..%2Fv1%2Fmodels", "/v1/models%00"]


@pytest.fixture(scope="module")
def server(launch_server):
    with launch_server(["--api-key", *KEYS, "--disable-fastapi-docs", "--root-path", "/prefix"],
                       env={"INFERD_API_KEY": ENV_KEY}) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        yield client


def raw_get(server, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """Send the path byte for byte (httpx would normalise some of these)."""
    conn = HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize("method, path", PUBLIC)
def test_public_routes_need_no_key(http, method, path):
    assert http.request(method, path).status_code == 200


@pytest.mark.parametrize("method, path", PROTECTED)
def test_everything_else_is_denied_without_a_key(http, method, path):
    resp = http.request(method, path, json={"prompt": "x"} if method == "POST" else None)
    assert resp.status_code == 401
    assert resp.json() == UNAUTHORIZED
    assert resp.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("header", ["Bearer sk-wrong", "Bearer", "sk-alpha", "Basic sk-alpha",
                                    f"Bearer {ENV_KEY}", "Bearer sk-alpha2", "Bearer sk-alph",
                                    "Token sk-alpha", "Bearersk-alpha"])
def test_wrong_keys_and_schemes_are_401(http, header):
    resp = http.get("/v1/models", headers={"Authorization": header})
    assert resp.status_code == 401 and resp.json() == UNAUTHORIZED


@pytest.mark.parametrize("header", ["Bearer sk-alpha", "Bearer sk-beta", "bearer sk-alpha",
                                    "BEARER sk-beta", "Bearer  sk-alpha"])
def test_right_key_any_scheme_case_succeeds(http, header):
    resp = http.get("/v1/models", headers={"Authorization": header})
    assert resp.status_code == 200 and resp.json()["data"][0]["id"] == "tiny-llama"


@pytest.mark.parametrize("path", TRICKS)
def test_path_tricks_never_bypass_auth(server, path):
    status, body = raw_get(server, path)
    assert status == 401, (path, status, body[:200])


def test_path_tricks_with_the_key_route_normally(server):
    auth = {"Authorization": f"Bearer {KEYS[0]}"}
    assert raw_get(server, "/v1/models", auth)[0] == 200
    assert raw_get(server, "/prefix/v1/models", auth)[0] == 200  # the root path is stripped
    assert raw_get(server, "/V1/models", auth)[0] == 404  # routing is case-sensitive
    assert raw_get(server, "//v1/models", auth)[0] == 404
    assert raw_get(server, "/v1/models/", auth)[0] in (200, 307)


def test_public_paths_behind_the_root_path(server):
    assert raw_get(server, "/prefix/health")[0] == 200
    assert raw_get(server, "/prefix/version")[0] == 200
    # Spelling tricks on public paths are still no way in: they route nowhere protected.
    for path in ("//health", "/health/", "/prefix//health"):
        status, body = raw_get(server, path)
        assert status in (200, 307, 404), (path, status)
        assert b'"data"' not in body


def test_docs_disabled_are_404_with_a_key(http):
    auth = {"Authorization": f"Bearer {KEYS[1]}"}
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert http.get(path, headers=auth).status_code == 404


def test_cors_preflight_is_exempt(http):
    resp = http.options("/v1/chat/completions", headers={
        "Origin": "http://example.com", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert resp.status_code == 200
    assert resp.headers["access-control-allow-origin"] == "*"
    # A 401 still carries CORS headers, so a browser can read it.
    denied = http.get("/v1/models", headers={"Origin": "http://example.com"})
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == "*"


def test_openai_client_with_and_without_the_key(server):
    assert [m.id for m in server.client(api_key=KEYS[1]).models.list().data] == ["tiny-llama"]
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="sk-nope").models.list()
    completion = server.client(api_key=KEYS[0]).completions.create(
        model="tiny-llama", prompt="Hello", max_tokens=3, temperature=0)
    assert completion.usage.completion_tokens == 3


def test_root_path_with_key_serves_generation(http):
    resp = http.post("/prefix/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                     headers={"Authorization": f"Bearer {KEYS[0]}"})
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 2
