"""Store commands: create, quantize, list, show, cp, rm, gc, verify, export, demo."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
from rich.table import Table

from zreg.registry.export import export_model
from zreg.registry.importer import import_folder, scan_folder
from zreg.registry.inspect_model import list_models, show_model
from zreg.registry.maintenance import collect_garbage, remove_model, verify_store
from zreg.registry.names import name_from_folder, parse_name
from zreg.registry.quantize import DEFAULT_FP8_SKIP, MODES, Policy
from zreg.registry.quantize_stored import quantize_model, total_bytes
from zreg.registry.store import Store

from .app import cli, fail_cleanly, human_bytes, out, store_option, waiting
from .progress import byte_progress, console


def quantize_options(fn):
    fn = click.option("--quantize-skip", "skip", multiple=True, metavar="PATTERN",
                      help="Glob on layer names (component/tensor) to keep unquantized; replaces the "
                           f"defaults ({', '.join(DEFAULT_FP8_SKIP)}). Repeatable.")(fn)
    return fn


def report_build(verb: str, name, result, total: int, seconds: float) -> None:
    rate = total / seconds / 1e6 if seconds > 0 else 0
    click.echo(f"{verb} {name.short()} ({result.digest[:19]}): {result.tensors} tensors, "
               f"{result.layers} layers, {result.new_blobs} new blobs ({human_bytes(result.new_bytes)}), "
               f"using {result.reused_blobs} existing blobs; {human_bytes(total)} read in "
               f"{seconds:.1f}s ({rate:.0f} MB/s)")
    if result.quantized:
        lossless = {True: ", lossless", False: ", lossy (values changed)", None: ""}[result.lossless]
        click.echo(f"quantized {result.quantized} tensors{lossless}; model is {human_bytes(result.bytes)}")


def policy_from(mode: str | None, skip: tuple[str, ...]) -> Policy | None:
    if mode is None:
        return None
    return Policy(mode, tuple(skip) if skip else None)


@cli.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("-n", "--name", help="Model name (default: the folder's name).")
@click.option("--quantize", "mode", type=click.Choice(MODES), help="Quantize while importing.")
@quantize_options
@store_option
@fail_cleanly
def create(folder: Path, name: str | None, mode: str | None, skip: tuple[str, ...], models: str | None):
    """Import a diffusers FOLDER into the store as per-tensor blobs plus a manifest."""
    store = Store(models)
    model_name = parse_name(name or name_from_folder(folder.resolve().name))
    policy = policy_from(mode, skip)
    plan = scan_folder(folder)
    start = time.monotonic()
    with byte_progress(f"importing {model_name.short()}", plan.total_bytes) as advance:
        result = import_folder(store, plan, model_name, policy, on_bytes=advance)
    for skipped in result.skipped:
        console.print(f"skipped {skipped} (not a safetensors weight or pipeline file)", highlight=False)
    report_build("created", model_name, result, plan.total_bytes, time.monotonic() - start)


@cli.command()
@click.argument("mode", type=click.Choice(MODES))
@click.argument("source")
@click.argument("destination", required=False)
@quantize_options
@store_option
@fail_cleanly
def quantize(mode: str, source: str, destination: str | None, skip: tuple[str, ...], models: str | None):
    """Make a quantized copy of a stored model (DESTINATION defaults to SOURCE's name with tag MODE)."""
    store = Store(models)
    src = parse_name(source)
    dst = parse_name(destination) if destination else src.with_tag(mode)
    total = total_bytes(store, src)
    start = time.monotonic()
    with byte_progress(f"quantizing {src.short()} -> {dst.short()}", total) as advance:
        result = quantize_model(store, src, dst, policy_from(mode, skip), on_bytes=advance)
    report_build("created", dst, result, total, time.monotonic() - start)


@cli.command(name="list")
@store_option
@fail_cleanly
def list_(models: str | None):
    """List the models in the store."""
    table = Table(box=None, pad_edge=False)
    for col in ("NAME", "ID", "SIZE", "MODIFIED"):
        table.add_column(col)
    for entry in list_models(Store(models)):
        modified = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.modified))
        table.add_row(entry.name, entry.digest[7:19], human_bytes(entry.size), modified)
    out.print(table)


@cli.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@store_option
@fail_cleanly
def show(name: str, as_json: bool, models: str | None):
    """Show a model's components, tensors, parameters, dtypes and bytes."""
    summary = show_model(Store(models), name)
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2))
        return
    click.echo(f"model         {summary.name}")
    click.echo(f"digest        {summary.digest}")
    click.echo(f"architecture  {summary.architecture or '-'}")
    click.echo(f"parameters    {summary.parameters:,}")
    click.echo(f"tensors       {summary.tensors}")
    click.echo(f"size          {human_bytes(summary.bytes)} ({human_bytes(summary.shared_bytes)} shared with other models)")
    table = Table(box=None, pad_edge=False)
    for col in ("COMPONENT", "CLASS", "TENSORS", "PARAMETERS", "DTYPES", "SIZE"):
        table.add_column(col)
    for comp_name, comp in summary.components.items():
        dtypes = ", ".join(f"{d} x{n}" for d, n in comp.dtypes.items()) or "-"
        table.add_row(comp_name, comp.class_name or "-", str(comp.tensors), f"{comp.parameters:,}",
                      dtypes, human_bytes(comp.bytes))
    out.print(table)


@cli.command()
@click.argument("source")
@click.argument("destination")
@store_option
@fail_cleanly
def cp(source: str, destination: str, models: str | None):
    """Give a model another name (the manifest is copied byte for byte)."""
    store = Store(models)
    src, _, data = store.resolve(source)
    dst = parse_name(destination)
    store.manifests.write_bytes(dst, data)
    click.echo(f"copied {src.short()} to {dst.short()}")


@cli.command()
@click.argument("names", nargs=-1, required=True)
@click.option("--keep-blobs", is_flag=True, help="Only remove the name; leave blobs for `zreg gc`.")
@store_option
@fail_cleanly
def rm(names: tuple[str, ...], keep_blobs: bool, models: str | None):
    """Remove models (and the blobs no other model uses)."""
    store = Store(models)
    for name in names:
        model_name = parse_name(name)
        result = remove_model(store, model_name, prune=not keep_blobs, on_wait=waiting)
        click.echo(f"deleted {model_name.short()} ({result.blobs} blobs, {human_bytes(result.bytes)} freed)")


@cli.command()
@click.option("--dry-run", is_flag=True, help="Say what would be removed, remove nothing.")
@store_option
@fail_cleanly
def gc(dry_run: bool, models: str | None):
    """Delete blobs no manifest references, and stale temp files."""
    result = collect_garbage(Store(models), dry_run=dry_run, on_wait=waiting)
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{verb} {result.blobs} unreferenced blobs ({human_bytes(result.bytes)}), "
               f"{result.temps} stale temp or partial files and {result.uploads} abandoned upload sessions")


@cli.command()
@click.argument("names", nargs=-1)
@store_option
@fail_cleanly
def verify(names: tuple[str, ...], models: str | None):
    """Re-hash blobs and check every manifest against them (all models by default)."""
    store = Store(models)
    selected = [parse_name(n) for n in names] or None
    report = verify_store(store, selected)
    for problem in report.problems:
        click.echo(f"problem: {problem}", err=True)
    status = "FAILED" if report.problems else "ok"
    click.echo(f"verify {status}: {report.models} models, {report.blobs} blobs, {human_bytes(report.bytes)}, "
               f"{len(report.problems)} problems")
    if report.problems:
        sys.exit(1)


@cli.command()
@click.argument("name")
@click.argument("folder", type=click.Path(path_type=Path))
@store_option
@fail_cleanly
def export(name: str, folder: Path, models: str | None):
    """Rebuild a diffusers FOLDER from a stored model."""
    dest = export_model(Store(models), name, folder)
    click.echo(f"exported {parse_name(name).short()} to {dest}")


@cli.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=None,
              help="Where to write the fixture folder (default: a folder under the store root).")
@store_option
@fail_cleanly
def demo(workdir: Path | None, models: str | None):
    """Run the main job on the embedded tiny Z-Image model."""
    from zreg.fixtures.tiny_zimage import write_tiny_zimage
    from zreg.runtime import blas

    from .run_commands import generate

    blas.reexec_with_fast_blas(lambda: 0)  # the generate steps below use MLX's CPU matmuls (tiny model)
    store = Store(models)
    workdir = workdir or store.root.parent / "demo"
    folder = workdir / "tiny-zimage"
    if not folder.exists():
        write_tiny_zimage(folder)
    click.echo(f"fixture folder: {folder}")
    ctx = click.get_current_context()
    ctx.invoke(create, folder=folder, name="tiny-zimage", mode=None, skip=(), models=str(store.root))
    ctx.invoke(show, name="tiny-zimage", as_json=False, models=str(store.root))
    ctx.invoke(verify, names=("tiny-zimage",), models=str(store.root))
    exported = workdir / f"export-{int(time.time())}"
    ctx.invoke(export, name="tiny-zimage", folder=exported, models=str(store.root))
    ctx.invoke(quantize, mode="fp8", source="tiny-zimage", destination="tiny-zimage:fp8", skip=(),
               models=str(store.root))
    images = []
    for name in ("tiny-zimage", "tiny-zimage:fp8"):
        path = workdir / f"{name.replace(':', '-')}.png"
        ctx.invoke(generate, name=name, prompt="a red fox in the snow", size="256x256", width=None,
                   height=None, steps=4, seed=42, guidance=None, negative=None, noise=None, output=path,
                   device=None, low_memory=False, force=False, models=str(store.root))
        images.append(path)
    click.echo("images: " + ", ".join(str(p) for p in images))


