"""The MLX runtime: stored Z-Image models to images.

    backend.py   where it runs (Metal, CUDA or CPU) and in which dtype; memory available
    blas.py      which BLAS MLX's CPU backend uses, and the re-exec that preloads a fast one
    weights.py   stored components: tensors opened with mx.load, checked against the config
    layers.py    Linear (float or mxfp8) and RMSNorm
    ops.py       attention, SiLU, GroupNorm, 3x3 conv: MLX, or numpy on an x86 CPU where MLX is slow
    memory.py    peak-memory estimate of a request, and the check before loading
    png.py       the output file, with the parameters in PNG text chunks
    zimage/      the model: tokenizer, text_encoder, transformer, vae, scheduler, pipeline

Importing this package imports no MLX (the CLI may re-execute itself before MLX loads).
"""


def open_model(store, name: str, device: str | None = None):
    """(ZImage pipeline, Backend) for a stored model: configs parsed, tensors checked, nothing
    loaded yet. `device`: "cpu", "gpu" or None (ZREG_DEVICE, else auto)."""
    from .backend import select
    from .weights import StoredModel
    from .zimage.pipeline import ZImage

    backend = select(device)
    backend.activate()
    return ZImage(StoredModel.open(store, name), backend), backend
