"""The OpenAI-compatible image API and model lifecycle endpoints, on an aiohttp app.

    POST /v1/images/generations     OpenAI's request and response; `stream: true` sends SSE
                                    (`event: progress` per step, then `done` or `error`)
    GET  /v1/images/files/{id}.png  images answered with `response_format: "url"` (expire)
    GET  /api/tags   GET /api/ps   POST /api/stop      Ollama-style listing and unloading

Handlers parse and validate, then hand the work to `ModelService` on worker threads; errors
leave in OpenAI's shape `{"error": {"message", "type", "param", "code"}}` (docs/openapi.json).
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import re
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from zreg.registry.errors import ModelNotFound, ZregError
from zreg.registry.inspect_model import list_models

from .errors import BadRequest, NotEnoughMemory, UnsupportedModel
from .png import encode_png, generation_text
from .service import Cancelled, ModelService, QueueFull, parse_keep_alive

MAX_BODY = 1 << 20
MAX_IMAGES = 4
MAX_SIDE = 4096
MAX_STEPS = 200
# The runtime's request fields under their API names.
API_PARAMS = {"width": "size", "height": "size", "guidance": "guidance_scale", "negative": "negative_prompt"}
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
SERVICE = web.AppKey("zreg.images", "ImageAPI")


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.type, self.param, self.code, self.headers = status, type_, param, code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)


def api_error(e: Exception) -> ApiError:
    """The one place zreg exceptions become HTTP statuses."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, ModelNotFound):
        return ApiError(404, str(e), param="model", code="model_not_found")
    if isinstance(e, QueueFull):
        return ApiError(503, str(e), type_="server_error", code="queue_full",
                        headers={"Retry-After": str(e.retry_after)})
    if isinstance(e, UnsupportedModel):
        return ApiError(400, str(e), param="model", code="unsupported_model")
    if isinstance(e, NotEnoughMemory):
        return ApiError(507, str(e), type_="server_error", code="not_enough_memory")
    if isinstance(e, BadRequest):
        return ApiError(400, str(e), code="invalid_value")
    if isinstance(e, ZregError):
        return ApiError(500, str(e), type_="server_error")
    return ApiError(500, "internal server error (see the server log)", type_="server_error")


@dataclass
class ImageParams:
    model: str
    prompt: str
    n: int
    size: tuple[int, int] | None
    response_format: str
    stream: bool
    seed: int | None
    steps: int | None
    negative_prompt: str | None
    guidance_scale: float | None
    keep_alive: float | None


def _field(body: dict, name: str, kind, default=None, *, check=None, message=""):
    value = body.get(name, default)
    if value is None:
        return default
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ApiError(400, f"'{name}' must be an integer, got {value!r}", param=name, code="invalid_type")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ApiError(400, f"'{name}' must be a number, got {value!r}", param=name, code="invalid_type")
    if kind is str and not isinstance(value, str):
        raise ApiError(400, f"'{name}' must be a string, got {value!r}", param=name, code="invalid_type")
    if kind is bool and not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be true or false, got {value!r}", param=name, code="invalid_type")
    if check is not None and not check(value):
        raise ApiError(400, message.format(value=value), param=name, code="invalid_value")
    return value


def parse_params(body) -> ImageParams:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = _field(body, "model", str)
    if not model:
        raise ApiError(400, "'model' is required", param="model", code="missing_required_parameter")
    prompt = _field(body, "prompt", str)
    if prompt is None or not prompt.strip():
        raise ApiError(400, "'prompt' is required and must not be empty", param="prompt",
                       code="missing_required_parameter")
    size = None
    raw_size = _field(body, "size", str)
    if raw_size not in (None, "auto"):
        match = _SIZE.match(raw_size)
        if not match:
            raise ApiError(400, f"'size' must be \"WIDTHxHEIGHT\" such as \"1024x1024\", got {raw_size!r}",
                           param="size", code="invalid_value")
        size = (int(match.group(1)), int(match.group(2)))
        if max(size) > MAX_SIDE or min(size) < 1:
            raise ApiError(400, f"'size' {raw_size} is too large: each side must be at most {MAX_SIDE}",
                           param="size", code="invalid_value")
    try:
        keep_alive = parse_keep_alive(body["keep_alive"]) if "keep_alive" in body else None
    except BadRequest as e:
        raise ApiError(400, str(e), param="keep_alive", code="invalid_value") from None
    return ImageParams(
        model=model, prompt=prompt, size=size,
        n=_field(body, "n", int, 1, check=lambda v: 1 <= v <= MAX_IMAGES,
                 message=f"'n' must be between 1 and {MAX_IMAGES}, got {{value}}"),
        response_format=_field(body, "response_format", str, "b64_json", check=lambda v: v in ("b64_json", "url"),
                               message="'response_format' must be \"b64_json\" or \"url\", got {value!r}"),
        stream=_field(body, "stream", bool, False),
        seed=_field(body, "seed", int, check=lambda v: 0 <= v < 2 ** 63,
                    message="'seed' must be a non-negative integer, got {value}"),
        steps=_field(body, "steps", int, check=lambda v: 1 <= v <= MAX_STEPS,
                     message=f"'steps' must be between 1 and {MAX_STEPS}, got {{value}}"),
        negative_prompt=_field(body, "negative_prompt", str),
        guidance_scale=_field(body, "guidance_scale", float, check=lambda v: 0 <= v <= 100,
                              message="'guidance_scale' must be between 0 and 100, got {value}"),
        keep_alive=keep_alive)


class ImageStore:
    """PNG files for `response_format: "url"`, each valid for `ttl` seconds."""

    def __init__(self, folder: Path, ttl: float):
        self.folder, self.ttl = folder, ttl
        self.folder.mkdir(parents=True, exist_ok=True)
        self._expiry: dict[str, float] = {}
        self._lock = threading.Lock()

    def put(self, data: bytes) -> str:
        image_id = secrets.token_urlsafe(16)
        (self.folder / f"{image_id}.png").write_bytes(data)
        with self._lock:
            self._expiry[image_id] = time.time() + self.ttl
        return image_id

    def path(self, image_id: str) -> Path | None:
        with self._lock:
            expiry = self._expiry.get(image_id)
        if expiry is None or expiry < time.time():
            return None
        return self.folder / f"{image_id}.png"

    def purge(self) -> None:
        now = time.time()
        with self._lock:
            gone = [i for i, t in self._expiry.items() if t < now]
            for image_id in gone:
                del self._expiry[image_id]
        for image_id in gone:
            (self.folder / f"{image_id}.png").unlink(missing_ok=True)


class ImageAPI:
    def __init__(self, service: ModelService, images: ImageStore, *, reap_interval: float = 1.0):
        self.service, self.images, self.reap_interval = service, images, reap_interval
        self.pool = ThreadPoolExecutor(4, thread_name_prefix="zreg-api")   # loading, listing
        # Every generation runs on this one thread, in arrival order: the device does one at a
        # time anyway, and MLX keeps per-thread state warm. Waiting requests wait in asyncio.
        self.device = ThreadPoolExecutor(1, thread_name_prefix="zreg-device")

    # ---- the generation endpoint -----------------------------------------------------------

    async def generations(self, request: web.Request) -> web.StreamResponse:
        try:
            params = parse_params(await self._json(request))
            loop = asyncio.get_running_loop()
            loaded = await loop.run_in_executor(self.pool, self.service.load, params.model, params.keep_alive)
            requests_ = [self._request(loaded, params, i) for i in range(params.n)]
            self.service.admit()
        except Exception as e:  # noqa: BLE001 - every failure answers in OpenAI's shape
            return api_error(e).response()
        try:
            if params.stream:
                return await self._stream(request, loaded, params, requests_)
            data = []
            for index, gen_request in enumerate(requests_):
                data.append(await self._run_one(request, loaded, params, gen_request, index, None))
            return web.json_response({"created": int(time.time()), "data": data})
        except Exception as e:  # noqa: BLE001
            return api_error(e).response()
        finally:
            self.service.release()

    def _request(self, loaded, params: ImageParams, index: int):
        from .zimage.pipeline import Request

        width, height = params.size if params.size else (None, None)
        seed = params.seed + index if params.seed is not None else None
        gen = Request(prompt=params.prompt, width=width, height=height, steps=params.steps, seed=seed,
                      guidance=params.guidance_scale, negative=params.negative_prompt)
        try:
            return loaded.pipeline.resolve(gen)   # validates size, steps...; fills the seed
        except BadRequest as e:  # the runtime's field names -> the API's
            param = API_PARAMS.get(e.param, e.param)
            raise ApiError(400, str(e), param=param, code="invalid_value") from None

    async def _run_one(self, http_request, loaded, params, gen_request, index, on_step):
        transport = http_request.transport

        def cancelled() -> bool:
            return transport is None or transport.is_closing()

        def work():  # on a worker thread: PNG encoding of a large image would stall the event loop
            result = self.service.generate(loaded, gen_request, on_step=on_step, cancelled=cancelled)
            png = encode_png(result.image, generation_text(result, loaded.name, loaded.digest))
            if params.response_format == "url":
                return {"url": self.images.put(png), "seed": result.request.seed}
            return {"b64_json": base64.b64encode(png).decode(), "seed": result.request.seed}

        item = await asyncio.get_running_loop().run_in_executor(self.device, work)
        if "url" in item:
            item["url"] = f"{http_request.scheme}://{http_request.host}/v1/images/files/{item['url']}.png"
        return item

    async def _stream(self, http_request, loaded, params, requests_) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(http_request)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        async def send(event: str, body: dict) -> None:
            await response.write(f"event: {event}\ndata: {json.dumps(body)}\n\n".encode())

        try:
            data = []
            for index, gen_request in enumerate(requests_):
                def on_step(k, n, seconds, index=index):
                    body = {"step": k, "total": n}
                    if params.n > 1:
                        body["index"] = index
                    loop.call_soon_threadsafe(events.put_nowait, body)

                task = asyncio.ensure_future(self._run_one(http_request, loaded, params, gen_request, index, on_step))
                while not task.done() or not events.empty():
                    getter = asyncio.ensure_future(events.get())
                    await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
                    if getter.done():
                        await send("progress", getter.result())
                    else:
                        getter.cancel()
                data.append(task.result())
            await send("done", {"created": int(time.time()), "data": data})
        except (ConnectionResetError, Cancelled):
            return response            # the client left; its generation stopped at the next step
        except Exception as e:  # noqa: BLE001
            try:
                await send("error", api_error(e).body())
            except ConnectionResetError:
                return response
        await response.write_eof()
        return response

    async def _json(self, request: web.Request):
        if request.content_length is not None and request.content_length > MAX_BODY:
            raise ApiError(413, f"request body is {request.content_length} bytes; the limit is {MAX_BODY}",
                           code="request_too_large")
        raw = await request.content.read(MAX_BODY + 1)
        if len(raw) > MAX_BODY:
            raise ApiError(413, f"request body is over the {MAX_BODY}-byte limit", code="request_too_large")
        try:
            return json.loads(raw)
        except ValueError as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None

    # ---- files and lifecycle ---------------------------------------------------------------

    async def image_file(self, request: web.Request) -> web.StreamResponse:
        path = self.images.path(request.match_info["image_id"])
        if path is None or not path.exists():
            return ApiError(404, "no such image (it may have expired)", code="not_found").response()
        return web.FileResponse(path, headers={"Content-Type": "image/png"})

    async def tags(self, request: web.Request) -> web.Response:
        models = await asyncio.get_running_loop().run_in_executor(None, list_models, self.service.store)
        return web.json_response({"models": [
            {"name": m.name, "model": m.name, "digest": m.digest, "size": m.size,
             "modified_at": _iso(m.modified)} for m in models]})

    async def ps(self, request: web.Request) -> web.Response:
        return web.json_response({"models": [
            {"name": m["name"], "model": m["name"], "digest": m["digest"], "size": m["size"],
             "expires_at": _iso(m["expires_at"]) if m["expires_at"] else None, "active": m["active"]}
            for m in self.service.ps()]})

    async def stop(self, request: web.Request) -> web.Response:
        try:
            body = await self._json(request)
            name = _field(body if isinstance(body, dict) else {}, "model", str)
            if not name:
                raise ApiError(400, "'model' is required", param="model", code="missing_required_parameter")
            was_loaded = await asyncio.get_running_loop().run_in_executor(None, self.service.stop, name)
        except Exception as e:  # noqa: BLE001
            return api_error(e).response()
        return web.json_response({"model": name, "status": "unloaded" if was_loaded else "not loaded"})

    async def housekeeping(self, app: web.Application):
        """Unload models whose keep-alive ran out; drop expired image files."""
        async def loop():
            while True:
                await asyncio.sleep(self.reap_interval)
                self.service.reap()
                self.images.purge()

        task = asyncio.ensure_future(loop())
        yield
        task.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.device.shutdown(wait=False, cancel_futures=True)
        self.service.shutdown()


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None or math.isinf(timestamp):
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def add_image_routes(app: web.Application, service: ModelService, images: ImageStore) -> ImageAPI:
    api = ImageAPI(service, images)
    app[SERVICE] = api
    app.router.add_post("/v1/images/generations", api.generations)
    app.router.add_get("/v1/images/files/{image_id}.png", api.image_file)
    app.router.add_get("/api/tags", api.tags)
    app.router.add_get("/api/ps", api.ps)
    app.router.add_post("/api/stop", api.stop)
    app.cleanup_ctx.append(api.housekeeping)
    return api
