"""Models kept ready for the image API: keep-alive, one generation at a time, a bounded queue.

A model is "loaded" once its pipeline object exists (configs parsed, tensors checked; weights
are mmapped per request and freed phase by phase, see zimage/pipeline.py). It stays loaded for
its keep-alive (request `keep_alive`, else $ZREG_KEEP_ALIVE, else 5 minutes; 0 unloads right
after the request, a negative value keeps it forever) and is unloaded when that runs out, on
`stop`, or when another model needs the room. Generations run one at a time on the device; at
most `max_queue` more wait, and the next is refused with `QueueFull` (the API's 503).
"""

from __future__ import annotations

import gc
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx

from zreg.registry.errors import ModelNotFound, ZregError
from zreg.registry.names import parse_name
from zreg.registry.store import Store

from . import heap
from .backend import Backend, memory_available
from .errors import BadRequest

DEFAULT_KEEP_ALIVE = 300.0
DEFAULT_MAX_QUEUE = 4
_DURATION = re.compile(r"^(-?\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class QueueFull(ZregError):
    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class Cancelled(ZregError):
    pass


def parse_keep_alive(value) -> float:
    """Seconds from 300, "5m", "30s", "1h", "0" or -1 (forever -> inf), as Ollama takes them."""
    if value is None:
        return parse_keep_alive(os.environ.get("ZREG_KEEP_ALIVE", DEFAULT_KEEP_ALIVE))
    if isinstance(value, bool):
        raise BadRequest(f"keep_alive {value!r} is not a duration")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value).strip())
        if not match:
            raise BadRequest(f"keep_alive {value!r} is not a duration such as 300, \"5m\", \"1h\" or -1")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    return math.inf if seconds < 0 else seconds


@dataclass
class Loaded:
    name: str
    digest: str
    pipeline: object
    size: int                       # bytes it needs when running (estimate)
    keep_alive: float
    loaded_at: float = field(default_factory=time.time)
    expires_at: float = math.inf
    active: int = 0                 # requests running or waiting on it


def open_pipeline(store: Store, name: str, backend: Backend):
    from .weights import StoredModel
    from .zimage.pipeline import ZImage

    return ZImage(StoredModel.open(store, name), backend)


def _model_bytes(pipeline) -> int:
    """What a run needs resident at most: its largest component's weights (one at a time)."""
    parts = getattr(pipeline, "parts", {})
    return max((part.nbytes for part in parts.values()), default=0)


class ModelService:
    def __init__(self, store: Store, backend: Backend, *, max_queue: int = DEFAULT_MAX_QUEUE,
                 keep_alive=None, memory_budget: int | None = None,
                 loader: Callable[[Store, str, Backend], object] = open_pipeline):
        self.store, self.backend, self.max_queue = store, backend, max_queue
        self.default_keep_alive = parse_keep_alive(keep_alive)
        self.memory_budget = memory_budget
        self._loader = loader
        self._lock = threading.Lock()          # guards the fields below
        self._device = threading.Lock()        # one generation at a time
        self._loaded: dict[str, Loaded] = {}   # by manifest digest
        self._in_flight = 0
        self._recent: list[float] = []         # seconds of recent generations, for Retry-After

    # ---- models ------------------------------------------------------------------------------

    def resolve(self, name: str):
        """(canonical short name, manifest digest) or ModelNotFound. Every request resolves (a tag
        may have moved), so this only hashes the manifest's bytes; loading parses them."""
        from zreg.registry.digest import sha256_bytes

        try:
            model_name = parse_name(name)
            raw = self.store.manifests.read_bytes(model_name)
        except ZregError as e:
            raise ModelNotFound(f"model {name!r} not found: {e}") from None
        return model_name.short(), sha256_bytes(raw)

    def load(self, name: str, keep_alive: float | None = None) -> Loaded:
        short, digest = self.resolve(name)
        with self._lock:
            loaded = self._loaded.get(digest)
            if loaded is not None:
                if keep_alive is not None:
                    loaded.keep_alive = keep_alive
                return loaded
        pipeline = self._loader(self.store, short, self.backend)
        loaded = Loaded(short, digest, pipeline, _model_bytes(pipeline),
                        self.default_keep_alive if keep_alive is None else keep_alive)
        with self._lock:
            if digest in self._loaded:       # another request loaded it meanwhile
                return self._loaded[digest]
            self._make_room(loaded.size)
            self._loaded[digest] = loaded
        return loaded

    def _make_room(self, size: int) -> None:
        """Unload idle models, least recently used first, until `size` more bytes fit."""
        budget = self.memory_budget if self.memory_budget is not None else memory_available(self.backend)[0]
        used = sum(m.size for m in self._loaded.values())
        for victim in sorted(self._loaded.values(), key=lambda m: m.expires_at):
            if used + size <= budget:
                break
            if victim.active == 0:
                self._unload(victim)
                used -= victim.size

    def _unload(self, loaded: Loaded) -> None:
        self._loaded.pop(loaded.digest, None)
        loaded.pipeline = None
        gc.collect()
        mx.clear_cache()
        heap.release()

    def stop(self, name: str) -> bool:
        """Unload a model now (after its running request, if any). False if it was not loaded."""
        _, digest = self.resolve(name)
        with self._lock:
            loaded = self._loaded.get(digest)
            if loaded is None:
                return False
            if loaded.active:
                loaded.expires_at = 0.0     # the request in flight unloads it when done
                loaded.keep_alive = 0.0
            else:
                self._unload(loaded)
        return True

    def reap(self, now: float | None = None) -> list[str]:
        """Unload every idle model whose keep-alive ran out; returns their names."""
        now = time.time() if now is None else now
        with self._lock:
            expired = [m for m in self._loaded.values() if m.active == 0 and m.expires_at <= now]
            for m in expired:
                self._unload(m)
        return [m.name for m in expired]

    def ps(self) -> list[dict]:
        with self._lock:
            return [{"name": m.name, "digest": m.digest, "size": m.size, "loaded_at": m.loaded_at,
                     "expires_at": None if math.isinf(m.expires_at) else m.expires_at,
                     "active": m.active} for m in self._loaded.values()]

    def shutdown(self) -> None:
        with self._lock:
            for m in list(self._loaded.values()):
                self._unload(m)

    # ---- requests ----------------------------------------------------------------------------

    def admit(self) -> None:
        """Take a queue slot or raise QueueFull; pair with `release`."""
        with self._lock:
            if self._in_flight > self.max_queue:
                recent = sorted(self._recent)[len(self._recent) // 2] if self._recent else 5.0
                raise QueueFull(f"{self._in_flight} requests are running or queued (limit "
                                f"{self.max_queue + 1}); retry later", max(1, math.ceil(recent * self._in_flight)))
            self._in_flight += 1

    def release(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def generate(self, loaded: Loaded, request, on_step=None, cancelled: Callable[[], bool] = lambda: False):
        """Run one request on the device (blocking; call from a worker thread)."""
        def step(k, n, seconds):
            if cancelled():
                raise Cancelled("the client went away")
            if on_step:
                on_step(k, n, seconds)

        with self._lock:
            loaded.active += 1
        try:
            with self._device:
                if cancelled():
                    raise Cancelled("the client went away")
                if loaded.pipeline is None:         # stopped while this request waited
                    raise ModelNotFound(f"model {loaded.name!r} was unloaded")
                start = time.perf_counter()
                result = loaded.pipeline.generate(request, on_step=step)
                with self._lock:
                    self._recent = (self._recent + [time.perf_counter() - start])[-20:]
                return result
        finally:
            with self._lock:
                loaded.active -= 1
                loaded.expires_at = time.time() + loaded.keep_alive
                if loaded.active == 0 and loaded.keep_alive == 0:
                    self._unload(loaded)
