"""The sana-restore command: exit codes, one-line errors, outputs written, inputs never overwritten."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from diffusers_restore.cli import main


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory):
    from diffusers import SanaPipeline

    from diffusers_restore import SanaRestorationPipeline
    from diffusers_restore.testing import get_tiny_components

    path = tmp_path_factory.mktemp("pipe") / "restorer"
    SanaRestorationPipeline.from_sana_pipeline(SanaPipeline(**get_tiny_components(seed=0))).save_pretrained(path)
    return str(path)


def _write_images(folder, count=2, size=(24, 20)):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        path = os.path.join(folder, f"img{index}.png")
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_help_is_instant_and_lists_commands():
    result = subprocess.run([sys.executable, "-m", "diffusers_restore.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("restore", "evaluate", "make-pairs", "demo"):
        assert command in result.stdout


def test_missing_model_path_exits_2(tmp_path, capsys):
    images = _write_images(tmp_path / "in", 1)
    code = main(["restore", images[0], "-o", str(tmp_path / "out"), "--model", str(tmp_path / "nope")])
    assert code == 2
    line = _error_line(capsys)
    assert "does not exist" in line and "nope" in line


def test_folder_without_model_index_exits_2(tmp_path, capsys):
    images = _write_images(tmp_path / "in", 1)
    code = main(["restore", images[0], "-o", str(tmp_path / "out"), "--model", str(tmp_path / "in")])
    assert code == 2
    assert "model_index.json" in _error_line(capsys)


def test_hub_id_while_offline_exits_2(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    images = _write_images(tmp_path / "in", 1)
    code = main(["restore", images[0], "-o", str(tmp_path / "out"), "--model", "someone/not-cached-restorer"])
    assert code == 2
    line = _error_line(capsys)
    assert "offline" in line and "someone/not-cached-restorer" in line


def test_unknown_degradation_exits_2(tmp_path, capsys, tiny_pipeline_dir):
    _write_images(tmp_path / "clean", 1)
    code = main(["evaluate", "--model", tiny_pipeline_dir, "--images", str(tmp_path / "clean"),
                 "--degradation", "frobnicate:3", "-o", str(tmp_path / "eval")])
    assert code == 2
    line = _error_line(capsys)
    assert "frobnicate" in line and "gaussian_noise" in line  # names the known ones


def test_restore_writes_outputs_and_skips_unreadable(tmp_path, capsys, tiny_pipeline_dir):
    images = _write_images(tmp_path / "in", 2)
    broken = tmp_path / "in" / "broken.png"
    broken.write_bytes(b"not a png")
    before = {p: open(p, "rb").read() for p in images}
    code = main(["restore", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", tiny_pipeline_dir,
                 "--steps", "2", "--guidance-scale", "1"])
    assert code == 1  # everything readable was restored, but one input failed
    assert "broken.png" in capsys.readouterr().err
    for path in images:
        restored = Image.open(tmp_path / "out" / os.path.basename(path))
        assert restored.size == Image.open(path).size
        assert open(path, "rb").read() == before[path]  # input untouched


def test_restore_into_input_folder_never_overwrites(tmp_path, tiny_pipeline_dir):
    images = _write_images(tmp_path / "in", 1)
    original = open(images[0], "rb").read()
    code = main(["restore", images[0], "-o", str(tmp_path / "in"), "--model", tiny_pipeline_dir, "--steps", "1"])
    assert code == 0
    assert open(images[0], "rb").read() == original
    assert os.path.exists(tmp_path / "in" / "img0_restored.png")


def test_evaluate_writes_tables_and_grids(tmp_path, tiny_pipeline_dir):
    _write_images(tmp_path / "clean", 2, size=(32, 32))
    out = tmp_path / "eval"
    code = main(["evaluate", "--model", tiny_pipeline_dir, "--images", str(tmp_path / "clean"),
                 "--degradation", "gaussian_noise:25", "--degradation", "jpeg:20", "--baselines", "blur",
                 "--steps", "1", "-o", str(out)])
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    assert set(report["mean"]) == {"gaussian_noise:25", "jpeg:20"}
    methods = set(report["mean"]["gaussian_noise:25"])
    assert {"input", "restored"} <= methods
    assert sum(m.startswith("blur (best sigma") for m in methods) == 1
    assert len(report["per_image"]) == 2 * 2 * (2 + 5)  # images x degradations x (input, restored, 5 blur sigmas)
    table = (out / "results.md").read_text()
    assert "| gaussian_noise:25 | restored |" in table
    assert len(os.listdir(out / "grids")) == 4
    grid = Image.open(out / "grids" / os.listdir(out / "grids")[0])
    assert grid.size == (96, 32)


def test_evaluate_needs_exactly_one_source(tmp_path, capsys, tiny_pipeline_dir):
    assert main(["evaluate", "--model", tiny_pipeline_dir, "-o", str(tmp_path)]) == 2
    assert "exactly one" in _error_line(capsys)


def test_evaluate_pairs_csv(tmp_path, tiny_pipeline_dir):
    clean, degraded = _write_images(tmp_path / "pairs", 2, size=(32, 32))
    (tmp_path / "pairs" / "pairs.csv").write_text(
        f"image_path,condition_image_path,caption\n{os.path.basename(clean)},{os.path.basename(degraded)},\n"
    )
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", tiny_pipeline_dir, "--pairs", str(tmp_path / "pairs" / "pairs.csv"),
                 "--steps", "1", "-o", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    assert set(report["mean"]) == {"pairs"}
    value = [r for r in report["per_image"] if r["method"] == "input"][0]["psnr"]
    assert value == pytest.approx(report["mean"]["pairs"]["input"]["psnr"])


def test_evaluate_sample_photos_with_vae_round_trip(tmp_path, tiny_pipeline_dir):
    pytest.importorskip("skimage")
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", tiny_pipeline_dir, "--sample-photos", "held-out", "--crop", "24",
                 "--degradation", "gaussian_noise:25", "--vae-roundtrip", "--steps", "1", "-o", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    assert {r["image"] for r in report["per_image"]} == {"chelsea", "coffee", "rocket"}
    methods = report["mean"]["gaussian_noise:25"]
    assert {"input", "restored", "vae(clean)", "vae(input)"} <= set(methods)
    # the tiny kit's VAE is untrained: its round trip is far from the clean image, which the table must show
    assert methods["vae(clean)"]["psnr"] < methods["input"]["psnr"]


def test_evaluate_rejects_two_sources(tmp_path, capsys, tiny_pipeline_dir):
    assert main(["evaluate", "--model", tiny_pipeline_dir, "--images", str(tmp_path), "--sample-photos", "held-out",
                 "-o", str(tmp_path / "out")]) == 2
    assert "exactly one" in _error_line(capsys)


def test_model_bundled_names_the_package_folder(monkeypatch, tmp_path, capsys):
    from diffusers_restore import demo

    _write_images(tmp_path / "in", 1, size=(32, 32))
    monkeypatch.chdir(tmp_path)  # no local folder called "bundled"
    monkeypatch.setattr(demo, "BUNDLED_MODEL_DIR", str(tmp_path / "missing"))
    assert main(["restore", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", "bundled"]) == 2
    assert "build_bundled_model.py" in _error_line(capsys)


def test_noise_estimate_recovers_a_known_sigma_and_nlm_runs_on_unknown_noise():
    pytest.importorskip("skimage")
    from diffusers_restore.baselines import estimate_noise_sigma, run_baselines

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:128, 0:128] / 128.0
    clean = np.stack([0.5 + 0.3 * np.sin(3 * x + 2 * y + p) for p in (0, 1, 2)], axis=-1)
    for sigma in (0.02, 0.1):
        noisy = clean + rng.normal(0, sigma, clean.shape)
        assert estimate_noise_sigma(noisy) == pytest.approx(sigma, rel=0.1)
    image = Image.fromarray((np.clip(clean + rng.normal(0, 0.1, clean.shape), 0, 1) * 255).astype(np.uint8))
    results = run_baselines(image, image, "nlm", "jpeg:20")  # no known sigma: estimated
    assert results["nlm"].size == image.size


def test_sampling_defaults_follow_the_model():
    """--model bundled is a one-step restorer: without flags it is sampled as BUNDLED_CALL_KWARGS says; flags still
    win; any other model gets 20 steps and the pipeline's own CFG defaults."""
    from diffusers_restore.cli import _pipeline_kwargs, build_parser
    from diffusers_restore.demo import BUNDLED_CALL_KWARGS

    parser = build_parser()
    bundled = _pipeline_kwargs(parser.parse_args(["restore", "x.png", "-o", "out", "--model", "bundled"]))
    assert {key: bundled[key] for key in BUNDLED_CALL_KWARGS} == BUNDLED_CALL_KWARGS
    assert BUNDLED_CALL_KWARGS["num_inference_steps"] == 1
    chosen = _pipeline_kwargs(parser.parse_args(["restore", "x.png", "-o", "out", "--model", "bundled", "--steps", "3",
                                                 "--guidance-scale", "2"]))
    assert chosen["num_inference_steps"] == 3 and chosen["guidance_scale"] == 2.0
    other = _pipeline_kwargs(parser.parse_args(["restore", "x.png", "-o", "out", "--model", "org/restorer"]))
    assert other["num_inference_steps"] == 20 and "guidance_scale" not in other
