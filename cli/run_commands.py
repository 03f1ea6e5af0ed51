"""Run commands: generate (alias run) and info. Parse, call zreg.runtime, render."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from zreg import __version__
from zreg.registry.errors import ZregError
from zreg.registry.store import Store
from zreg.runtime import blas

from .app import cli, fail_cleanly, human_bytes, store_option
from .progress import console


def _size(size: str | None, width: int | None, height: int | None) -> tuple[int | None, int | None]:
    from zreg.runtime.errors import BadRequest

    if size:
        if width or height:
            raise BadRequest("give either --size WxH or --width/--height, not both")
        try:
            w, h = (int(v) for v in size.lower().split("x"))
        except ValueError:
            raise BadRequest(f"--size {size!r}: expected WIDTHxHEIGHT, e.g. 1024x768") from None
        return w, h
    return width, height


def _noise(path: Path | None):
    if path is None:
        return None
    import numpy as np

    from zreg.runtime.errors import BadRequest

    try:
        noise = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise BadRequest(f"--noise {path}: not a readable .npy file ({e})") from None
    if noise.dtype != np.float32:
        raise BadRequest(f"--noise {path}: dtype {noise.dtype}, expected float32")
    return noise


def _stored_bytes(models, name: str) -> int | None:
    """The model's stored size (None if it cannot be read: generate then says why)."""
    try:
        _, manifest, _ = Store(models).resolve(name)
    except ZregError:
        return None
    return sum(layer.size for layer in manifest.layers)


class _StepBar:
    """step k/N and seconds per step: a rich bar on a terminal, one line per step otherwise."""

    def __init__(self, total: int):
        self.total, self.progress, self.task = total, None, None

    def __enter__(self):
        if sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                     TextColumn("step {task.completed}/{task.total}"),
                                     TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                                     console=console, transient=False)
            self.progress.__enter__()
            self.task = self.progress.add_task("denoising", total=self.total, rate="")
        return self

    def step(self, k: int, n: int, seconds: float) -> None:
        if self.progress:
            self.progress.update(self.task, completed=k, rate=f"{seconds:.2f} s/step")
        else:
            console.print(f"step {k}/{n}: {seconds:.2f} s", highlight=False)

    def __exit__(self, *exc):
        if self.progress:
            self.progress.__exit__(*exc)


@cli.command()
@click.argument("name")
@click.argument("prompt")
@click.option("--size", help="WIDTHxHEIGHT, e.g. 1024x768 (default: the model's, 1024x1024).")
@click.option("--width", type=int, help="Image width (instead of --size).")
@click.option("--height", type=int, help="Image height (instead of --size).")
@click.option("--steps", type=int, help="Denoising steps (default 8, Z-Image-Turbo's).")
@click.option("--seed", type=int, help="Seed of the initial noise (default: random, printed and saved).")
@click.option("--guidance", type=float, help="Classifier-free guidance scale (default 0: off, as Turbo wants).")
@click.option("--negative", help="Negative prompt (with --guidance > 0).")
@click.option("--noise", type=click.Path(dir_okay=False, path_type=Path),
              help="Initial latent: a float32 .npy of shape [1, 16, H/8, W/8] (reproduces a reference run).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="PNG to write (default: <prompt-slug>-<timestamp>.png here).")
@click.option("--device", type=click.Choice(["auto", "cpu", "gpu"]), default=None,
              help="Where to run (default: $ZREG_DEVICE, else the GPU when MLX has one).")
@click.option("--low-memory", is_flag=True, help="Stream the transformer block by block and decode in smaller tiles.")
@click.option("--force", is_flag=True, help="Run even when the memory estimate is over what the device has.")
@store_option
@fail_cleanly
def generate(name, prompt, size, width, height, steps, seed, guidance, negative, noise, output, device,
             low_memory, force, models):
    """Generate an image from PROMPT with the stored model NAME (alias: run)."""
    started = time.perf_counter()
    blas.reexec_with_fast_blas(lambda: _stored_bytes(models, name))  # before MLX is imported
    from zreg.runtime import memory, open_model
    from zreg.runtime.backend import memory_available
    from zreg.runtime.png import default_output, generation_text, save_png
    from zreg.runtime.zimage.pipeline import Request

    w, h = _size(size, width, height)
    store = Store(models)
    model, backend = open_model(store, name, device)
    request = model.resolve(Request(prompt=prompt, width=w, height=h, steps=steps, seed=seed,
                                    guidance=guidance, negative=negative, noise=_noise(noise),
                                    low_memory=low_memory))
    est = memory.estimate(model, request)
    available, where = memory_available(backend)
    low = None if low_memory else memory.estimate(model, _with(request, low_memory=True))
    if not force:
        memory.check(est, available, where, low, fp8_hint=not _is_fp8(model))
    console.print(f"{model.model.name} on {backend.describe()}; {request.width}x{request.height}, "
                  f"{request.steps} steps, seed {request.seed}; estimated peak {est.describe()} of "
                  f"{memory.gb(available)} available", highlight=False, soft_wrap=True)

    with _StepBar(request.steps) as bar:
        result = model.generate(request, on_step=bar.step)
    out = output or default_output(prompt)
    text = generation_text(result, model.model.name, model.model.digest)
    text["software"] += f" (MLX {_mlx_version()}, {backend.kind})"
    save_png(out, result.image, text)
    t = result.timings
    per_step = sum(t["step_s"]) / len(t["step_s"])
    peak = max(result.memory[k] for k in ("text_encoder_peak", "transformer_peak", "vae_peak"))
    click.echo(f"saved {out} ({request.width}x{request.height}, seed {request.seed}): "
               f"{time.perf_counter() - started:.1f}s total, {per_step:.2f} s/step, "
               f"first step after {t['first_step_at_s']:.1f}s; MLX peak memory {memory.gb(peak)} "
               f"(estimated {memory.gb(est.total)})")


def _mlx_version() -> str:
    import mlx.core as mx

    return mx.__version__


def _with(request, **changes):
    from dataclasses import replace

    return replace(request, **changes)


def _is_fp8(model) -> bool:
    return any(p.quantization for p in model.parts.values())


cli.add_command(generate, name="run")


@cli.command()
@click.option("--device", type=click.Choice(["auto", "cpu", "gpu"]), default=None,
              help="Device to describe (default: the one generate would use).")
@store_option
@fail_cleanly
def info(device, models):
    """MLX version, device, memory available and the store path."""
    blas.reexec_with_fast_blas()
    import mlx.core as mx

    from zreg.runtime.backend import memory_available, select

    backend = select(device)
    available, where = memory_available(backend)
    click.echo(f"zreg          {__version__}")
    click.echo(f"mlx           {mx.__version__}")
    click.echo(f"device        {backend.describe()}")
    click.echo(f"gpu           {'yes' if mx.is_available(mx.gpu) else 'no'}")
    click.echo(f"memory        {human_bytes(available)} available ({where})")
    click.echo(f"store         {Store(models).root}")
