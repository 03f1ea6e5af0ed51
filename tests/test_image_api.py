"""The OpenAI-compatible image API of `zreg serve`, with the official openai client, raw SSE,
every error case, the queue, disconnects, keep-alive and unloading; responses are checked
against docs/openapi.json."""

import base64
import io
import json
import threading
import time
from pathlib import Path

import jsonschema
import mlx.core as mx
import pytest
import requests
from openai import OpenAI
from PIL import Image
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from zreg.registry.server import BackgroundServer, make_app
from zreg.runtime.api import ImageStore, add_image_routes
from zreg.runtime.backend import select
from zreg.runtime.service import ModelService

from .conftest import run_zreg
from .folders import make_model_folder

OPENAPI = json.loads((Path(__file__).parents[1] / "docs/openapi.json").read_text())
# OpenAPI 3.1 schemas are JSON Schema 2020-12, so the component schemas validate as they are.
REGISTRY = Registry().with_resource("urn:openapi", Resource.from_contents(OPENAPI, default_specification=DRAFT202012))


def check(schema: str, body) -> None:
    """Validate a response body against a component schema of docs/openapi.json."""
    validator = jsonschema.Draft202012Validator({"$ref": f"urn:openapi#/components/schemas/{schema}"},
                                                registry=REGISTRY)
    validator.validate(body)


@pytest.fixture
def server(store, tiny_zimage, tmp_path):
    run_zreg("create", tiny_zimage, "-n", "tiny", store=store)
    service = ModelService(store, select("cpu"), max_queue=2, keep_alive=300)
    app = make_app(store)
    api = add_image_routes(app, service, ImageStore(tmp_path / "images", ttl=2.0))
    api.reap_interval = 0.1
    with BackgroundServer(app) as srv:
        srv.service = service
        yield srv


def post(server, body, **kw):
    return requests.post(server.url + "/v1/images/generations", json=body, timeout=120, **kw)


def png_of(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_openai_client_b64_and_url(server):
    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    result = client.images.generate(model="tiny", prompt="a red fox", size="64x48", extra_body={"steps": 2, "seed": 7})
    image = png_of(result.data[0].b64_json)
    assert image.size == (64, 48)
    assert image.text["prompt"] == "a red fox" and image.text["seed"] == "7"
    assert image.text["steps"] == "2" and image.text["model_digest"].startswith("sha256:")
    again = client.images.generate(model="tiny", prompt="a red fox", size="64x48", extra_body={"steps": 2, "seed": 7})
    assert again.data[0].b64_json == result.data[0].b64_json      # same arguments, same image
    by_url = client.images.generate(model="tiny", prompt="a red fox", size="64x48", response_format="url",
                                    extra_body={"steps": 2, "seed": 7})
    fetched = requests.get(by_url.data[0].url, timeout=10)
    assert fetched.status_code == 200 and fetched.headers["Content-Type"] == "image/png"
    assert fetched.content == base64.b64decode(result.data[0].b64_json)
    time.sleep(2.2)  # the server was started with a 2-second image lifetime
    gone = requests.get(by_url.data[0].url, timeout=10)
    assert gone.status_code == 404
    check("Error", gone.json())


def test_n_images_each_with_its_own_seed(server):
    resp = post(server, {"model": "tiny", "prompt": "a cat", "size": "32x32", "n": 2, "steps": 2, "seed": 100})
    assert resp.status_code == 200
    body = resp.json()
    check("ImagesResponse", body)
    assert [d["seed"] for d in body["data"]] == [100, 101]
    assert body["data"][0]["b64_json"] != body["data"][1]["b64_json"]
    random_seeds = post(server, {"model": "tiny", "prompt": "a cat", "size": "32x32", "n": 2, "steps": 1}).json()
    assert random_seeds["data"][0]["seed"] != random_seeds["data"][1]["seed"]


def read_sse(resp):
    events, event = [], None
    for line in resp.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            events.append((event, json.loads(line[6:])))
    return events


def test_raw_sse_stream(server):
    with post(server, {"model": "tiny", "prompt": "a dog", "size": "32x32", "steps": 3, "n": 2, "stream": True},
              stream=True) as resp:
        assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        events = read_sse(resp)
    progress = [body for event, body in events if event == "progress"]
    for body in progress:
        check("Progress", body)
    assert [(p["index"], p["step"], p["total"]) for p in progress] == [(i, s, 3) for i in (0, 1) for s in (1, 2, 3)]
    assert events[-1][0] == "done"
    check("ImagesResponse", events[-1][1])
    assert len(events[-1][1]["data"]) == 2


def test_stream_request_with_bad_input_gets_a_plain_error(server):
    # Input checks run before the stream starts, so they answer with a status code, not an event.
    with post(server, {"model": "tiny", "prompt": "x", "size": "32x32", "steps": 1, "stream": True,
                       "negative_prompt": "blurry"}, stream=True) as resp:
        assert resp.status_code == 400
        check("Error", resp.json())


@pytest.mark.parametrize("body, status, param", [
    ({"model": "tiny", "prompt": "x", "size": "big"}, 400, "size"),
    ({"model": "tiny", "prompt": "x", "size": "65x64"}, 400, "size"),
    ({"model": "tiny", "prompt": "x", "size": "8192x8192"}, 400, "size"),
    ({"model": "tiny", "prompt": "x", "n": 0}, 400, "n"),
    ({"model": "tiny", "prompt": "x", "n": 5}, 400, "n"),
    ({"model": "tiny", "prompt": "x", "response_format": "jpeg"}, 400, "response_format"),
    ({"model": "tiny", "prompt": ""}, 400, "prompt"),
    ({"model": "tiny"}, 400, "prompt"),
    ({"prompt": "x"}, 400, "model"),
    ({"model": "tiny", "prompt": "x", "steps": 0}, 400, "steps"),
    ({"model": "tiny", "prompt": "x", "n": "2"}, 400, "n"),
    ({"model": "tiny", "prompt": "x", "keep_alive": "soon"}, 400, "keep_alive"),
    ({"model": "nope", "prompt": "x"}, 404, "model"),
])
def test_errors_in_openai_shape(server, body, status, param):
    resp = post(server, body)
    assert resp.status_code == status, resp.text
    check("Error", resp.json())
    assert resp.json()["error"]["param"] == param


def test_body_limits_and_bad_json(server):
    resp = requests.post(server.url + "/v1/images/generations", data=b"{" + b" " * (2 << 20) + b"}",
                         headers={"Content-Type": "application/json"}, timeout=30)
    assert resp.status_code == 413
    check("Error", resp.json())
    resp = requests.post(server.url + "/v1/images/generations", data=b"{not json", timeout=30)
    assert resp.status_code == 400 and "not valid JSON" in resp.json()["error"]["message"]


def test_non_image_model_is_refused(server, store, tmp_path):
    folder = make_model_folder(tmp_path / "plain")
    (folder / "model_index.json").unlink()
    run_zreg("create", folder, "-n", "plain", store=store)
    resp = post(server, {"model": "plain", "prompt": "x"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "model"


def test_twenty_concurrent_requests_complete_or_get_503(server):
    results = []

    def one():
        resp = post(server, {"model": "tiny", "prompt": "busy", "size": "64x64", "steps": 4})
        results.append((resp.status_code, resp.headers.get("Retry-After"), resp.json()))

    threads = [threading.Thread(target=one) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(results) == 20
    assert {status for status, _, _ in results} <= {200, 503}
    assert any(status == 200 for status, _, _ in results) and any(status == 503 for status, _, _ in results)
    for status, retry_after, body in results:
        if status == 503:
            assert int(retry_after) >= 1
            check("Error", body)
        else:
            check("ImagesResponse", body)
    assert requests.get(server.url + "/api/tags", timeout=10).status_code == 200


def test_disconnect_mid_stream_cancels_the_generation(server):
    resp = post(server, {"model": "tiny", "prompt": "long", "size": "64x64", "steps": 200, "stream": True}, stream=True)
    lines = resp.iter_lines(decode_unicode=True)
    assert next(line for line in lines if line.startswith("event: ")) == "event: progress"
    resp.close()                       # the client goes away after the first step
    started = time.monotonic()
    deadline = started + 30
    while time.monotonic() < deadline:
        models = requests.get(server.url + "/api/ps", timeout=10).json()["models"]
        if models and models[0]["active"] == 0:
            break
        time.sleep(0.05)
    assert models[0]["active"] == 0
    # The slot is free again: a new request runs at once.
    assert post(server, {"model": "tiny", "prompt": "next", "size": "32x32", "steps": 1}).status_code == 200


def test_ps_stop_tags_and_memory_returns_to_baseline(server, store):
    baseline = mx.get_active_memory()
    assert post(server, {"model": "tiny", "prompt": "x", "size": "32x32", "steps": 1}).status_code == 200
    ps = requests.get(server.url + "/api/ps", timeout=10).json()
    check("PsResponse", ps)
    assert [m["name"] for m in ps["models"]] == ["tiny:latest"] and ps["models"][0]["expires_at"]
    tags = requests.get(server.url + "/api/tags", timeout=10).json()
    check("TagsResponse", tags)
    assert "tiny:latest" in [m["name"] for m in tags["models"]]
    out = run_zreg("ps", "--host", server.url, store=store).stdout
    assert "tiny:latest" in out
    out = run_zreg("stop", "tiny", "--host", server.url, store=store).stdout
    assert "tiny: unloaded" in out
    assert requests.get(server.url + "/api/ps", timeout=10).json()["models"] == []
    resp = requests.post(server.url + "/api/stop", json={"model": "tiny"}, timeout=10)
    check("StopResponse", resp.json())
    assert resp.json()["status"] == "not loaded"
    resp = requests.post(server.url + "/api/stop", json={"model": "nope"}, timeout=10)
    assert resp.status_code == 404
    check("Error", resp.json())
    assert mx.get_active_memory() <= baseline + (1 << 20)


def test_keep_alive_unloads(server):
    assert post(server, {"model": "tiny", "prompt": "x", "size": "32x32", "steps": 1, "keep_alive": 0}).status_code == 200
    assert requests.get(server.url + "/api/ps", timeout=10).json()["models"] == []
    assert post(server, {"model": "tiny", "prompt": "x", "size": "32x32", "steps": 1, "keep_alive": "1s"}).status_code == 200
    assert len(requests.get(server.url + "/api/ps", timeout=10).json()["models"]) == 1
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and requests.get(server.url + "/api/ps", timeout=10).json()["models"]:
        time.sleep(0.1)
    assert requests.get(server.url + "/api/ps", timeout=10).json()["models"] == []
