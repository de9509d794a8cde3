# Copyright 2026 The diffusers-restore authors. Licensed under the Apache License, Version 2.0.
"""SanaDegradationPipeline: the degrade prompt, its own call defaults, the direction recorded in model_index.json
(neither pipeline class loads the other's folders), and make-pairs with a learned degradation model."""

import importlib
import json

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import SanaPipeline

from diffusers_restore import SanaDegradationPipeline, SanaRestorationPipeline, degrade_prompt
from diffusers_restore.data.degradations import severity
from diffusers_restore.testing import get_tiny_components


def _build(cls):
    restorer = SanaRestorationPipeline.from_sana_pipeline(SanaPipeline(**get_tiny_components(0)))
    components = {name: module for name, module in restorer.components.items()}
    return cls(**components, sampling_defaults={"num_inference_steps": 2, "guidance_scale": 1.0})


@pytest.fixture(scope="module")
def degrader_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("degrader") / "model"
    pipe = _build(SanaDegradationPipeline)
    pipe.set_sampling_defaults(restoration_guidance=0.0)
    pipe.save_pretrained(str(folder))
    return folder


def test_degrade_prompt_names_the_degradations_and_severity():
    assert degrade_prompt("jpeg", 10, 8) == "Degrade with JPEG compression. Severity: mean 10, spread 8 of 128"
    assert degrade_prompt(["gaussian_noise", "jpeg", "gaussian_noise"], 23, 17) == (
        "Degrade with gaussian noise and JPEG compression. Severity: mean 23, spread 17 of 128")
    assert degrade_prompt("film grain", 0, 127).startswith("Degrade with film grain.")
    for bins, name in (((128, 0), "mu_bin"), ((0, -1), "sigma_bin"), ((1.5, 0), "mu_bin"), ((True, 0), "mu_bin")):
        with pytest.raises(ValueError, match=name):
            degrade_prompt("jpeg", *bins)
    with pytest.raises(ValueError, match="at least one"):
        degrade_prompt([], 1, 1)


def test_the_direction_is_recorded_and_each_class_refuses_the_other(degrader_dir, tmp_path):
    index = json.loads((degrader_dir / "model_index.json").read_text())
    assert index["direction"] == "degrade" and index["_class_name"] == "SanaDegradationPipeline"
    with pytest.raises(ValueError, match="trained to 'degrade' images.*load it with SanaDegradationPipeline"):
        SanaRestorationPipeline.from_pretrained(str(degrader_dir))
    restorer_dir = tmp_path / "restorer"
    _build(SanaRestorationPipeline).save_pretrained(str(restorer_dir))
    assert json.loads((restorer_dir / "model_index.json").read_text())["direction"] == "restore"
    with pytest.raises(ValueError, match="trained to 'restore' images.*load it with SanaRestorationPipeline"):
        SanaDegradationPipeline.from_pretrained(str(restorer_dir))
    loaded = SanaDegradationPipeline.from_pretrained(str(degrader_dir))
    assert loaded.sampling_defaults["restoration_guidance"] == 0.0


def test_the_call_builds_the_prompt_and_has_the_degrade_defaults(degrader_dir, monkeypatch):
    pipe = SanaDegradationPipeline.from_pretrained(str(degrader_dir))
    seen = {}

    def recording_call(self, **kwargs):
        seen.update(kwargs)
        return "result"

    monkeypatch.setattr(SanaRestorationPipeline, "__call__", recording_call)
    image = PIL.Image.new("RGB", (32, 32))
    assert pipe(image, degradation="jpeg", mu_bin=10, sigma_bin=8, num_inference_steps=3) == "result"
    assert seen["prompt"] == degrade_prompt("jpeg", 10, 8)
    assert seen["negative_prompt"] == "" and seen["color_fix"] is None and seen["fidelity"] == 0.0
    assert seen["num_inference_steps"] == 3  # the restoration call's arguments pass through
    with pytest.raises(ValueError, match="Give `prompt`, or `degradation`, `mu_bin` and `sigma_bin`"):
        pipe(image, degradation="jpeg")
    with pytest.raises(ValueError, match="not both"):
        pipe(image, prompt="x", mu_bin=3)
    with pytest.raises(ValueError, match="would undo the degradation"):
        pipe(image, prompt="x", fidelity=0.5)


def test_a_real_call_returns_an_image_of_the_input_size(degrader_dir):
    pipe = SanaDegradationPipeline.from_pretrained(str(degrader_dir))
    out = pipe(PIL.Image.new("RGB", (40, 24), (120, 80, 40)), degradation="gaussian_noise", mu_bin=5, sigma_bin=4,
               generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (1, 24, 40, 3) and np.isfinite(out.images).all()


def test_make_pairs_with_a_degradation_model(degrader_dir, tmp_path):
    make_pairs = importlib.import_module("diffusers_restore.data.make_pairs")
    clean = tmp_path / "clean"
    clean.mkdir()
    rng = np.random.default_rng(0)
    for index in range(2):
        PIL.Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(clean / f"{index}.png")
    out = tmp_path / "pairs"
    code = make_pairs.main(["--input-dir", str(clean), "--output-dir", str(out), "--degradation",
                            f"model:{degrader_dir}", "--degrader-request", "jpeg:10:8", "--quiet"])
    assert code == 0
    rows = (out / "pairs.csv").read_text().splitlines()[1:]
    assert len(rows) == 2
    for index in range(2):
        degraded = PIL.Image.open(out / "degraded" / f"{index}.png")
        record = json.loads(degraded.text[make_pairs.PNG_TEXT_KEY])
        assert record["records"] == [{"name": "jpeg", "params": {"model": str(degrader_dir), "mu_bin": 10,
                                                                 "sigma_bin": 8}}]
        assert degraded.size == (40, 32)
        severity(PIL.Image.open(clean / f"{index}.png"), degraded)  # a valid pair
    # a rerun keeps the pairs (same settings), a request without the model flag is refused
    assert make_pairs.main(["--input-dir", str(clean), "--output-dir", str(out), "--degradation",
                            f"model:{degrader_dir}", "--degrader-request", "jpeg:10:8", "--quiet"]) == 0
    assert make_pairs.main(["--input-dir", str(clean), "--output-dir", str(tmp_path / "x"), "--degradation", "jpeg",
                            "--degrader-request", "jpeg:10:8", "--quiet"]) == 2
    assert make_pairs.main(["--input-dir", str(clean), "--output-dir", str(tmp_path / "y"), "--degradation",
                            f"model:{degrader_dir}", "--degrader-request", "jpeg:200:8", "--quiet"]) == 2


def test_model_degradation_is_a_degradation_spec(degrader_dir, tmp_path):
    from diffusers_restore.data.degradations import apply_degradation_spec, parse_degradation_spec

    spec_text = f"model:{degrader_dir};jpeg:10:8,gaussian_noise:12:20"
    spec = parse_degradation_spec(spec_text)
    assert spec.name == "model" and spec.params["requests"] == (("jpeg", 10, 8), ("gaussian_noise", 12, 20))
    assert parse_degradation_spec(str(spec)) == spec  # the canonical string parses back
    clean = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8))
    first, records = apply_degradation_spec(clean, spec, np.random.default_rng(5))
    again, _ = apply_degradation_spec(clean, spec, np.random.default_rng(5))
    assert first.size == clean.size and first.mode == "RGB"
    assert np.array_equal(np.asarray(first), np.asarray(again))  # seeded by the rng: request and model noise
    assert records[0]["name"] in ("jpeg", "gaussian_noise") and records[0]["params"]["model"] == str(degrader_dir)
    # mixes with analytic degradations like any spec: both alternatives are drawn
    mix = parse_degradation_spec(f"jpeg:20|model:{degrader_dir};gaussian_noise:12:20")
    names = {apply_degradation_spec(clean, mix, np.random.default_rng(seed))[1][0]["params"].get("model", "analytic")
             for seed in range(8)}
    assert names == {"analytic", str(degrader_dir)}
    with pytest.raises(ValueError, match="no model_index.json"):
        parse_degradation_spec(f"model:{tmp_path};jpeg:10:8")
    with pytest.raises(ValueError, match="at least one request"):
        parse_degradation_spec(f"model:{degrader_dir}")
    with pytest.raises(ValueError, match="bins in 0-127"):
        parse_degradation_spec(f"model:{degrader_dir};jpeg:10:128")


def test_training_pairs_degraded_on_the_fly_by_a_model(degrader_dir, tmp_path):
    """What train_paired.py --degradation "model:DIR;..." does: the training dataset degrades each photo with the
    degradation model, and the prompt names what it asked for."""
    from diffusers_restore.data.paired_dataset import PairedDataset

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(1)
    for index in range(2):
        PIL.Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(photos / f"{index}.png")
    dataset = PairedDataset(str(photos), resolution=32, degradation=f"model:{degrader_dir};jpeg:10:8", seed=0)
    item = dataset[0]
    assert item["conditioning_pixel_values"].shape == (3, 32, 32)
    assert json.loads(item["degradation"])[0]["params"]["model"] == str(degrader_dir)
    assert "JPEG" in item["prompt"] or "jpeg" in item["prompt"].lower()
