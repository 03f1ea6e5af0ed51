"""Writing the generated image: a PNG with the generation parameters in its text chunks."""

from __future__ import annotations

import io
import os
import re
import time
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo


def generation_text(result, model_name: str, model_digest: str) -> dict[str, str]:
    """The text chunks of a generated image: what it takes to make it again."""
    from zreg import __version__

    r = result.request
    text = {"prompt": r.prompt, "seed": str(r.seed), "steps": str(r.steps), "size": f"{r.width}x{r.height}",
            "guidance": str(r.guidance), "model": model_name, "model_digest": model_digest,
            "software": f"zreg {__version__}"}
    if r.negative:
        text["negative_prompt"] = r.negative
    if r.noise is not None:
        import hashlib

        text["noise_sha256"] = hashlib.sha256(np.ascontiguousarray(r.noise).tobytes()).hexdigest()
    return text


def _info(text: dict[str, str]) -> PngInfo:
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, str(value))  # iTXt when the value is not Latin-1
    return info


def encode_png(image: np.ndarray, text: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="PNG", pnginfo=_info(text))
    return buf.getvalue()


def save_png(path: Path, image: np.ndarray, text: dict[str, str]) -> Path:
    """Write `image` (uint8 [H, W, 3]) with `text` as PNG text chunks (iTXt for non-Latin-1),
    through a temp file and a rename so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(encode_png(image, text))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_text(path: Path) -> dict[str, str]:
    with Image.open(path) as im:
        return dict(im.text)


def slug(prompt: str, limit: int = 48) -> str:
    words = re.findall(r"[a-z0-9]+", prompt.lower())
    out = ""
    for w in words:
        if len(out) + len(w) + 1 > limit:
            break
        out = f"{out}-{w}" if out else w
    return out or "image"


def default_output(prompt: str, folder: Path | None = None) -> Path:
    """`<prompt-slug>-<timestamp>.png` in the current folder, never an existing file."""
    folder = Path(folder or ".")
    stem = f"{slug(prompt)}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = folder / f"{stem}.png", 1
    while path.exists():
        path, n = folder / f"{stem}-{n}.png", n + 1
    return path
