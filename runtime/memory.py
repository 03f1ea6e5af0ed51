"""Peak memory of a request, estimated before anything is loaded, and the check against the device.

The pipeline holds one component at a time (text encoder, then transformer, then VAE), so the
peak is the largest of three phases, each = the weights resident in that phase + the largest
transient of one layer (a weight cast or dequantized at use) + that phase's activations. The
activation terms follow the code: blocks are evaluated one at a time, attention scores are made
a block of rows at a time (ops.attention), VAE convs in bands (ops.conv3x3). The coefficients
(5 token-rows of width `dim` alive inside attention, 3 of the FFN width inside the FFN, 6 of
width `dim` around them) were measured with
`mx.get_peak_memory` on the CPU path; tests/test_runtime_memory.py holds the estimate to within
20% of the measured peak.

What is measured and estimated is MLX's memory (weights + activations): device memory on a
GPU, and on the CPU everything but the process itself (Python, libraries: ~150-300 MB RSS),
which `check` adds as PROCESS_OVERHEAD.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import blas, ops
from .errors import NotEnoughMemory
from .weights import FP8_WEIGHT
from .zimage.pipeline import LOW_MEMORY_TILE, TILE_LATENT

PROCESS_OVERHEAD = 300 << 20
F32 = 4


@dataclass
class Phase:
    name: str
    weights: int       # resident weights
    transient: int     # one layer's cast/dequantized weight
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.transient + self.activations


@dataclass
class Estimate:
    phases: list[Phase]
    width: int
    height: int
    low_memory: bool

    @property
    def peak(self) -> Phase:
        return max(self.phases, key=lambda p: p.total)

    @property
    def total(self) -> int:
        return self.peak.total

    def describe(self) -> str:
        p = self.peak
        return (f"{gb(self.total)} at {self.width}x{self.height} ({p.name}: {gb(p.weights)} weights + "
                f"{gb(p.activations + p.transient)} working memory)")


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _linear_transient(part, names, compute_size: int) -> int:
    """Largest weight cast or dequantized at use among `names` (0 when all are already in the
    compute dtype)."""
    worst = 0
    for n in names:
        layer = part.tensors[n]
        if layer.shape is None or len(layer.shape) != 2:
            continue
        stored = {"F32": 4, "BF16": 2, "F16": 2}.get(layer.dtype, 1)
        if layer.dtype == FP8_WEIGHT or stored != compute_size:
            worst = max(worst, layer.shape[0] * layer.shape[1] * compute_size)
    return worst


def _attention_scores(heads: int, q_len: int, kv_len: int, numpy_path: bool) -> int:
    """Bytes of attention scores alive at once: a block of rows per core on the numpy path
    (numpy memory, outside MLX's count), all heads' scores (and their softmax) in MLX's fallback."""
    if not numpy_path:
        return heads * q_len * kv_len * F32
    return ops._THREADS * min(q_len, ops.ATTENTION_BLOCK) * kv_len * F32


def estimate(model, request) -> Estimate:
    """`model` is a pipeline.ZImage, `request` a resolved pipeline.Request; nothing is loaded
    (the prompts are tokenized, for their lengths)."""
    tc, xc, vc = model.transformer_cfg, model.text_cfg, model.vae_cfg
    backend = model.backend
    compute_size = backend.compute_dtype.size
    numpy_path = ops.numpy_kernels_on(backend.device, backend.compute_dtype)
    width, height, low_memory = request.width, request.height, request.low_memory
    captions = model.caption_lengths(request)
    phases = []

    # Text encoder: layers 0..N-2 (the embedding table is read row by row).
    part = model.parts["text_encoder"]
    p = model.text_prefix
    used = [n for n in part.tensors if n.startswith(p + "layers.")
            and int(n[len(p):].split(".")[1]) < xc.num_hidden_layers - 1]
    per_layer = sum(part.tensors[n].size for n in used) // max(1, xc.num_hidden_layers - 1)
    weights = per_layer if low_memory else sum(part.tensors[n].size for n in used)
    n = max(captions)
    acts = (8 * n * xc.hidden_size + 3 * n * xc.intermediate_size) * compute_size \
        + _attention_scores(xc.num_attention_heads, n, n, numpy_path)
    phases.append(Phase("text encoder", weights, _linear_transient(part, used, compute_size), acts))

    # Transformer: all weights (low memory: everything but the blocks, plus one block).
    part = model.parts["transformer"]
    blocks = ("layers.", "noise_refiner.", "context_refiner.")
    block_bytes = [n for n in part.tensors if n.startswith(blocks)]
    weights = sum(layer.size for layer in part.tensors.values())
    if low_memory:
        n_blocks = tc.n_layers + 2 * tc.n_refiner_layers
        weights -= sum(part.tensors[n].size for n in block_bytes) * (n_blocks - 1) // n_blocks
    h, w = model.latent_shape(width, height)[2:]
    img = (h // 2) * (w // 2)
    cap = max(captions)
    L = img + (-img) % 32 + cap + (-cap) % 32  # image and caption tokens, each padded to 32
    Ld, Lf = L * tc.dim * compute_size, L * tc.ffn_hidden * compute_size
    # Measured on the CPU: the numpy kernels (fused norm + rope, blocked attention) keep 5 rows of
    # width dim alive in attention; the plain MLX expressions 17 (rope temporaries, transposes).
    attention = (5 if numpy_path else 17) * Ld + _attention_scores(tc.n_heads, L, L, numpy_path)
    ffn = 3 * Lf
    acts = max(attention, ffn) + 6 * Ld
    if len(captions) > 1:
        acts += 2 * Ld  # the second (negative) prediction
    phases.append(Phase("transformer", weights, _linear_transient(part, list(part.tensors), compute_size), acts))

    # VAE decoder: weights converted at load to the compute dtype; the largest layer's working set.
    part = model.parts["vae"]
    weights = sum(_elements(layer) * (compute_size if len(layer.shape or ()) == 4 else _size(layer))
                  for name, layer in part.tensors.items() if name.startswith("decoder."))
    tile = LOW_MEMORY_TILE if low_memory else TILE_LATENT
    th, tw = (min(h, tile), min(w, tile)) if (h > tile or w > tile) else (h, w)
    acts = _vae_activations(vc, th, tw, compute_size, numpy_path)
    image = 3 * height * width * F32 * (3 if (h > tile or w > tile) else 1)
    phases.append(Phase("vae", weights, 0, acts + image))
    return Estimate(phases, width, height, low_memory)


def _elements(layer) -> int:
    out = 1
    for d in layer.shape or ():
        out *= d
    return out


def _size(layer) -> int:
    return {"F32": 4, "BF16": 2, "F16": 2}.get(layer.dtype, 1)


def _conv_extra(h: int, w: int, c_in: int, c_out: int, size: int, numpy_path: bool,
                upsample: bool = False) -> int:
    """Working memory of one 3x3 conv beyond its input (see ops.conv3x3)."""
    f = 2 if upsample else 1
    ho, wo = h * f, w * f
    out = ho * wo * c_out * size
    if not numpy_path:  # MLX's conv2d: the unfolded (im2col) input, and the upsampled input
        return out + ho * wo * c_in * 9 * size + (ho * wo * c_in * size if upsample else 0)
    # Bands of input rows: the padded flat band, the accumulator (one, summed into in place by
    # blas.sgemm; MLX's addmm keeps two alive where there is no fast BLAS), the taps (an
    # upsampling conv works on the low-resolution input, with 16 folded 2x2 taps).
    rows = ops.conv_band_rows(h, w, c_in, c_out)
    band = (rows + 3) * (w + 2) * c_in * 4
    acc = rows * (w + 2) * c_out * 4 * (1 if blas.sgemm() else 2)
    return out + band + acc + (16 if upsample else 9) * c_in * c_out * 4


def _vae_activations(vc, h: int, w: int, size: int, numpy_path: bool) -> int:
    """Walk the decoder at latent size (h, w): the largest working set of any one layer, plus
    the layer's input (alive until the layer returns)."""
    boc = list(vc.block_out_channels)
    c = boc[-1]
    act = lambda hh, ww, cc: hh * ww * cc * size  # noqa: E731
    # GroupNorm + SiLU before a conv: applied band by band inside the conv on the numpy path
    # (no buffer), MLX's temporaries otherwise.
    norm = 0 if numpy_path else 3
    worst = act(h, w, c) + _conv_extra(h, w, vc.latent_channels, c, size, numpy_path)  # conv_in

    def resnet(hh, ww, ci, co):
        x = act(hh, ww, ci)
        first = norm * act(hh, ww, ci) + _conv_extra(hh, ww, ci, co, size, numpy_path)
        # conv2 runs with h, the 1x1 shortcut's output (the skip path, added in conv2's output
        # pass on the numpy path; MLX adds it after, one more output-size temporary) alive.
        skip = act(hh, ww, co) if ci != co else 0
        after = 0 if numpy_path else act(hh, ww, co)
        second = act(hh, ww, co) + norm * act(hh, ww, co) + skip + after + \
            _conv_extra(hh, ww, co, co, size, numpy_path)
        return x + max(first, second)

    worst = max(worst, resnet(h, w, c, c))
    hw = h * w
    worst = max(worst, 7 * act(h, w, c) + _attention_scores(1, hw, hw, numpy_path))
    for i, co in enumerate(reversed(boc)):
        ci = c
        for j in range(vc.layers_per_block + 1):
            worst = max(worst, resnet(h, w, ci if j == 0 else co, co))
        c = co
        if i < len(boc) - 1:
            worst = max(worst, act(h, w, c) + _conv_extra(h, w, c, c, size, numpy_path, upsample=True))
            h, w = 2 * h, 2 * w
    worst = max(worst, (1 + norm) * act(h, w, c) + _conv_extra(h, w, c, vc.out_channels, size, numpy_path))
    return worst


def check(est: Estimate, available: int, where: str, low_memory_estimate: Estimate | None = None,
          fp8_hint: bool = True) -> None:
    """Refuse (NotEnoughMemory, with the numbers and the options) only when the estimate plus
    the process overhead is over what the device has."""
    need = est.total + PROCESS_OVERHEAD
    if need <= available:
        return
    options = []
    if low_memory_estimate is not None and not est.low_memory:
        fits = "fits" if low_memory_estimate.total + PROCESS_OVERHEAD <= available else "still too much"
        options.append(f"--low-memory (about {gb(low_memory_estimate.total)}, {fits})")
    options.append("a smaller --size")
    if fp8_hint:
        options.append("an FP8 copy of the model (zreg quantize)")
    raise NotEnoughMemory(f"not enough memory: this request needs about {est.describe()}, plus "
                          f"~{gb(PROCESS_OVERHEAD)} for the process; {gb(available)} is available "
                          f"({where}). Options: {', '.join(options)}; or --force to try anyway")
