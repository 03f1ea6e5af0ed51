"""Text to image with a stored Z-Image model, as diffusers' `ZImagePipeline` does it.

    prompt -> tokenizer -> text encoder (hidden_states[-2], real tokens) -> freed
    noise  -> transformer x steps (Euler, flow matching)                 -> freed
    latent -> VAE decoder (tiled when large)                             -> uint8 image

One component is resident at a time: the text encoder is freed before the transformer is
loaded, and the VAE is loaded only to decode. With `low_memory` the transformer and text
encoder are streamed block by block from the blobs (read, run, dropped), so only one block's
weights are resident; the page cache keeps repeated reads cheap when memory allows.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field, replace

import mlx.core as mx
import numpy as np

from .. import heap
from ..backend import Backend
from ..errors import BadRequest, UnsupportedModel
from ..layers import Linear, linear_weights, param_shapes
from ..weights import StoredModel, assign, check_tensors, materialize, read_rows, release
from . import vae as vae_mod
from .scheduler import SchedulerConfig, schedule
from .text_encoder import PREFIXES, UNUSED, TextEncoder, TextEncoderConfig
from .tokenizer import PromptTokenizer
from .transformer import PATCH, TransformerConfig, ZImageTransformer
from .vae import VAEConfig, VAEDecoder

ARCHITECTURE = "ZImagePipeline"
COMPONENTS = ("transformer", "text_encoder", "tokenizer", "vae", "scheduler")
# Generation defaults for this architecture: the published Z-Image-Turbo is distilled for 8 steps
# without classifier-free guidance (its model card and the notes); the base model wants ~50 steps
# and --guidance 3-5, given on the command line.
DEFAULT_STEPS = 8
DEFAULT_GUIDANCE = 0.0
TILE_LATENT = 128       # diffusers' tile: VAE sample_size 1024 / 8; decode in tiles above it
LOW_MEMORY_TILE = 64


@dataclass
class Request:
    prompt: str
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    seed: int | None = None
    guidance: float | None = None
    negative: str | None = None
    noise: np.ndarray | None = None   # [1, C, h, w] float32: the initial latent, as the reference makes it
    low_memory: bool = False


@dataclass
class Result:
    image: np.ndarray                 # uint8 [H, W, 3]
    latents: np.ndarray               # final latents [1, C, h, w] float32 (before the VAE)
    request: Request                  # with every default filled in (seed, steps, size, guidance)
    timings: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)  # MLX peak bytes per phase, measured


class ZImage:
    """A stored Z-Image model ready to run: configs parsed and every tensor checked against them
    (names, shapes, dtypes; no data read). Nothing is loaded until `generate`."""

    def __init__(self, model: StoredModel, backend: Backend):
        if model.config.architecture != ARCHITECTURE or "image" not in model.config.capabilities:
            raise UnsupportedModel(
                f"{model.name} is not a Z-Image model (architecture {model.config.architecture!r}, "
                f"capabilities {model.config.capabilities}); zreg generate runs {ARCHITECTURE}")
        self.model, self.backend = model, backend
        self.parts = {c: model.component(c) for c in COMPONENTS}
        self.transformer_cfg = TransformerConfig.from_dict(self.parts["transformer"].json("config.json"))
        self.text_cfg = TextEncoderConfig.from_dict(self.parts["text_encoder"].json("config.json"))
        self.vae_cfg = VAEConfig.from_dict(self.parts["vae"].json("config.json"))
        self.scheduler_cfg = SchedulerConfig.from_dict(self.parts["scheduler"].json("scheduler_config.json"))
        if self.transformer_cfg.cap_feat_dim != self.text_cfg.hidden_size:
            raise UnsupportedModel(f"transformer cap_feat_dim {self.transformer_cfg.cap_feat_dim} != text "
                                   f"encoder hidden_size {self.text_cfg.hidden_size}")
        if self.transformer_cfg.in_channels != self.vae_cfg.latent_channels:
            raise UnsupportedModel(f"transformer in_channels {self.transformer_cfg.in_channels} != VAE "
                                   f"latent_channels {self.vae_cfg.latent_channels}")
        self.text_prefix = self._text_prefix()
        self._check()

    # ---- checking --------------------------------------------------------------------------

    def _text_prefix(self) -> str:
        names = self.parts["text_encoder"].tensors
        return next((p for p in PREFIXES if f"{p}embed_tokens.weight" in names), "model.")

    def _check(self) -> None:
        transformer = ZImageTransformer(self.transformer_cfg)
        check_tensors(self.parts["transformer"], param_shapes(transformer), linear_weights(transformer))
        text_encoder, p = TextEncoder(self.text_cfg), self.text_prefix
        check_tensors(self.parts["text_encoder"], {p + k: v for k, v in param_shapes(text_encoder).items()},
                      {p + k for k in linear_weights(text_encoder)}, optional=set(UNUSED))
        vae = VAEDecoder(self.vae_cfg)
        shapes = {k: vae_mod.stored_shape(v) for k, v in param_shapes(vae).items()}
        encoder = vae_mod.encoder_shapes(self.vae_cfg)
        shapes.update(encoder)
        encoder_linears = {n for n, shape in encoder.items() if len(shape) == 2}
        check_tensors(self.parts["vae"], shapes, linear_weights(vae) | encoder_linears)

    # ---- requests --------------------------------------------------------------------------

    @property
    def size_multiple(self) -> int:
        return 2 * self.vae_cfg.scale_factor  # latent side must be a multiple of the 2x2 patch

    def latent_shape(self, width: int, height: int) -> tuple[int, int, int, int]:
        m = self.size_multiple
        return (1, self.vae_cfg.latent_channels, 2 * (height // m), 2 * (width // m))

    def resolve(self, request: Request) -> Request:
        """Fill defaults and refuse bad input with a message that says what to change."""
        r = replace(request)
        if not isinstance(r.prompt, str) or not r.prompt.strip():
            raise BadRequest("the prompt is empty", param="prompt")
        default = self.vae_cfg.sample_size
        r.width = default if r.width is None else r.width
        r.height = default if r.height is None else r.height
        m = self.size_multiple
        for label, v in (("width", r.width), ("height", r.height)):
            if v < m or v % m:
                raise BadRequest(f"{label} {v} is not a positive multiple of {m} (this model's VAE "
                                 f"scale {self.vae_cfg.scale_factor} x patch {PATCH}); try "
                                 f"{max(m, round(v / m) * m)}", param=label)
        r.steps = DEFAULT_STEPS if r.steps is None else r.steps
        if r.steps < 1:
            raise BadRequest(f"steps must be at least 1 (got {r.steps})", param="steps")
        r.guidance = DEFAULT_GUIDANCE if r.guidance is None else r.guidance
        if r.guidance < 0:
            raise BadRequest(f"guidance must be >= 0 (got {r.guidance})", param="guidance")
        if r.negative and r.guidance == 0:
            raise BadRequest("a negative prompt needs classifier-free guidance: add --guidance (e.g. 4)",
                             param="negative")
        if r.noise is not None:
            want = self.latent_shape(r.width, r.height)
            if tuple(r.noise.shape) != want:
                raise BadRequest(f"noise has shape {list(r.noise.shape)}, expected {list(want)} for "
                                 f"{r.width}x{r.height}", param="noise")
            if not np.isfinite(r.noise).all():
                raise BadRequest("noise holds NaN or infinite values", param="noise")
            r.noise = np.ascontiguousarray(r.noise, dtype=np.float32)
        if r.seed is None:
            r.seed = secrets.randbits(32)
        return r

    def initial_noise(self, r: Request) -> np.ndarray:
        """The request's noise, or standard normal noise from numpy's PCG64 seeded with r.seed
        (the same on every machine and backend)."""
        if r.noise is not None:
            return r.noise
        rng = np.random.Generator(np.random.PCG64(r.seed))
        return rng.standard_normal(self.latent_shape(r.width, r.height), dtype=np.float32)

    def tokenizer(self) -> PromptTokenizer:
        if not hasattr(self, "_tokenizer"):
            self._tokenizer = PromptTokenizer(self.parts["tokenizer"].read_file("tokenizer.json"))
        return self._tokenizer

    def prompts(self, r: Request) -> list[str]:
        """The prompts the text encoder runs: the prompt, and the negative one under CFG."""
        return [r.prompt] + ([r.negative or ""] if r.guidance > 0 else [])

    def caption_lengths(self, r: Request) -> list[int]:
        return [len(self.tokenizer().encode(p)) for p in self.prompts(r)]

    # ---- running ---------------------------------------------------------------------------

    def generate(self, request: Request, on_step=None, on_phase=None) -> Result:
        """Run a (resolved or not) request. `on_step(k, n, seconds)` after every step,
        `on_phase(name)` when a phase starts."""
        r = self.resolve(request)
        Linear.fp8_matmul = self.backend.fp8_matmul
        heap.retain()  # reuse freed activation buffers during the run (runtime/heap.py)
        try:
            return self._generate(r, on_step, on_phase or (lambda name: None))
        finally:
            mx.clear_cache()  # also after an error or a cancel from on_step: give the memory back
            heap.release()

    def _generate(self, r: Request, on_step, say) -> Result:
        dtype = self.backend.compute_dtype
        timings: dict = {}
        memory: dict = {}
        start = time.perf_counter()

        def phase(name):
            mx.reset_peak_memory()
            say(name)
            return time.perf_counter()

        t0 = phase("text encoder")
        captions = self.encode_prompts(self.prompts(r), dtype, r.low_memory)
        timings["text_encoder_s"] = time.perf_counter() - t0
        memory["text_encoder_peak"] = mx.get_peak_memory()

        t0 = phase("transformer")
        latents = mx.array(self.initial_noise(r))
        transformer, stream = self.load_transformer(r.low_memory)
        memory["transformer_resident"] = mx.get_active_memory()
        timings["transformer_load_s"] = time.perf_counter() - t0
        timings["first_step_at_s"] = time.perf_counter() - start
        sched = schedule(self.scheduler_cfg, r.steps, (latents.shape[2] // 2) * (latents.shape[3] // 2))
        layouts = [transformer.prepare(latents.shape[2:], c.shape[0]) for c in captions]
        step_s = []
        for i, t in enumerate(sched.model_times):
            t_step = time.perf_counter()
            tt = mx.array(np.array([t], dtype=np.float32))
            outs = [transformer(latents, tt, c, lay, dtype, stream) for c, lay in zip(captions, layouts)]
            pred = outs[0] if len(outs) == 1 else outs[0] + r.guidance * (outs[0] - outs[1])
            latents = sched.step(latents, -pred, i)
            mx.eval(latents)
            step_s.append(time.perf_counter() - t_step)
            if on_step:
                on_step(i + 1, r.steps, step_s[-1])
        timings["step_s"] = step_s
        memory["transformer_peak"] = mx.get_peak_memory()
        del transformer, captions, layouts
        mx.clear_cache()

        t0 = phase("vae")
        image = self.decode(latents, dtype, r.low_memory)
        timings["decode_s"] = time.perf_counter() - t0
        memory["vae_peak"] = mx.get_peak_memory()
        timings["total_s"] = time.perf_counter() - start
        return Result(image=image, latents=np.array(latents), request=r, timings=timings, memory=memory)

    def encode_prompts(self, prompts: list[str], dtype, low_memory: bool = False) -> list[mx.array]:
        """hidden_states[-2] of the real tokens of each prompt, [n_i, hidden]. The text encoder
        is loaded, run and dropped here."""
        part = self.parts["text_encoder"]
        tokenizer = self.tokenizer()
        model = TextEncoder(self.text_cfg)
        p = self.text_prefix
        names = [n[len(p):] for n in part.tensors  # stored names, so FP8 `.scales` come along
                 if n.startswith(p) and TextEncoder.used(n[len(p):], self.text_cfg)]
        stream = None
        if low_memory:
            stream = _Streamer(part, self.text_prefix, names)
        else:
            arrays = part.open([self.text_prefix + n for n in names])
            materialize(arrays)
            assign(model, {n: arrays[self.text_prefix + n] for n in names})
            del arrays
        out = []
        for prompt in prompts:
            ids = tokenizer.encode(prompt)
            rows = read_rows(part, self.text_prefix + "embed_tokens.weight", ids)
            hidden = model(mx.array(rows)[None].astype(dtype), each_layer=stream)
            mx.eval(hidden)
            out.append(hidden)
        del model
        mx.clear_cache()
        return out

    def load_transformer(self, low_memory: bool = False):
        """(model, per-block hook or None). Low memory keeps only the small non-block weights."""
        part = self.parts["transformer"]
        model = ZImageTransformer(self.transformer_cfg)
        names = list(part.tensors)
        block_prefixes = tuple(prefix + "." for prefix, _ in model.parts())
        if low_memory:
            names = [n for n in names if not n.startswith(block_prefixes)]
        arrays = part.open(names)
        materialize(arrays)
        assign(model, arrays)
        stream = None
        if low_memory:
            stream = _Streamer(part, "", [n for n in part.tensors if n.startswith(block_prefixes)])
        return model, stream

    def decode(self, latents: mx.array, dtype, low_memory: bool = False) -> np.ndarray:
        part = self.parts["vae"]
        model = VAEDecoder(self.vae_cfg)
        names = [n for n in part.tensors if n.startswith("decoder.")]
        arrays = part.open(names)
        materialize(arrays)
        for n in names:  # one tensor at a time, so each stored array is freed once converted
            arrays[n] = vae_mod.sanitize(n, arrays[n], dtype)
            mx.eval(arrays[n])
        assign(model, arrays)
        del arrays
        tile = LOW_MEMORY_TILE if low_memory else TILE_LATENT
        x = model.decode(latents, dtype, tile=tile)
        image = np.array(mx.round(x[0] * 255).astype(mx.uint8))
        del model, x
        return image


class _Streamer:
    """The low-memory hook: before a block runs, read its weights from the blobs; after, drop
    them, so one block's weights are resident at a time."""

    def __init__(self, part, prefix: str, names):
        self.part, self.prefix = part, prefix
        self.by_block: dict[str, list[str]] = {}
        for name in names:  # local names: "layers.3.attention.to_q.weight" -> block "layers.3"
            self.by_block.setdefault(".".join(name.split(".")[:2]), []).append(name)

    def __call__(self, block_name: str, block, run):
        names = self.by_block.get(block_name, [])
        arrays = self.part.open([self.prefix + n for n in names])
        materialize(arrays)
        cut = len(block_name) + 1
        assign(block, {n[cut:]: arrays[self.prefix + n] for n in names})
        del arrays
        out = run()
        mx.eval(out)
        release(block, [n[cut:] for n in names])
        return out
