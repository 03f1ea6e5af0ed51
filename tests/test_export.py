import torch
from diffusers import ZImagePipeline

from .conftest import run_zreg
from .folders import safetensors_tensors


def test_export_rebuilds_the_folder_diffusers_loads(store, tiny_zimage, tmp_path):
    run_zreg("create", tiny_zimage, "-n", "tiny", store=store)
    dest = tmp_path / "exported"
    run_zreg("export", "tiny", dest, store=store)
    source_files = sorted(p.relative_to(tiny_zimage) for p in tiny_zimage.rglob("*") if p.is_file())
    assert sorted(p.relative_to(dest) for p in dest.rglob("*") if p.is_file()) == source_files
    for rel in source_files:
        if rel.suffix != ".safetensors":
            assert (dest / rel).read_bytes() == (tiny_zimage / rel).read_bytes(), rel
    src, out = safetensors_tensors(tiny_zimage), safetensors_tensors(dest)
    assert src.keys() == out.keys()
    for key in src:
        assert src[key].dtype == out[key].dtype and src[key].tobytes() == out[key].tobytes(), key

    pipe = ZImagePipeline.from_pretrained(dest, torch_dtype=torch.float32)
    ref = ZImagePipeline.from_pretrained(tiny_zimage, torch_dtype=torch.float32)
    for part in ("transformer", "text_encoder", "vae"):
        got, want = getattr(pipe, part).state_dict(), getattr(ref, part).state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), part


def test_export_refuses_a_non_empty_destination_and_leaves_nothing(store, tiny_zimage, tmp_path):
    run_zreg("create", tiny_zimage, "-n", "tiny", store=store)
    dest = tmp_path / "busy"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    proc = run_zreg("export", "tiny", dest, store=store, check=False)
    assert proc.returncode != 0 and "not an empty folder" in proc.stderr
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir() if "zreg-export" in p.name] == []


def test_demo_runs_end_to_end(store, tmp_path):
    proc = run_zreg("demo", "--workdir", tmp_path / "demo", store=store, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "created tiny-zimage:latest" in proc.stdout
    assert "verify ok: 1 models" in proc.stdout
    assert "exported tiny-zimage:latest" in proc.stdout
