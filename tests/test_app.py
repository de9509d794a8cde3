"""The web app's work (`diffusers_restore.app.RestorationApp`), without a server or Gradio: checks, simulated
degradations with their scores, one pipeline call at a time, cancelling, and recovery after a failing request.
The served app is tested through Gradio's client and a real browser in test_app_server.py."""

import functools
import os
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_restore.app import (
    DEGRADATION_CHOICES,
    NO_DEGRADATION,
    AppRequestError,
    RestorationApp,
    degradation_spec,
    parse_tile_size,
)
from diffusers_restore.cli_common import BUNDLED, load_pipeline, resolve_model
from diffusers_restore.data.degradations import apply_degradation_spec, parse_degradation_spec


@pytest.fixture(scope="module")
def pipe():
    pipe = load_pipeline(resolve_model(BUNDLED))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def app(pipe, tmp_path):
    return RestorationApp(pipe, model_name=BUNDLED, max_image_side=128, output_dir=str(tmp_path))


def _photo(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    """A smooth colour image with some texture (a photo-like signal the bundled restorer handles)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([0.5 + 0.4 * np.sin(6 * x + c) * np.cos(4 * y - c) for c in range(3)], axis=-1)
    texture = 0.03 * rng.standard_normal((height, width, 1))
    return Image.fromarray((np.clip(base + texture, 0, 1) * 255).round().astype(np.uint8))


def _psnr(a: Image.Image, b: Image.Image) -> float:
    mse = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def test_every_menu_degradation_is_a_valid_spec():
    for choice, entry in DEGRADATION_CHOICES.items():
        spec = degradation_spec(choice)
        if entry is None:
            assert spec is None
            continue
        parse_degradation_spec(spec)
        if entry.has_level:
            for level in (entry.minimum, entry.maximum):
                parse_degradation_spec(degradation_spec(choice, level))
    assert degradation_spec("JPEG compression", 30) == "jpeg:30"
    assert degradation_spec("Downscale then upscale", 2.5) == "downscale:2.5"
    with pytest.raises(ValueError, match="unknown degradation 'sharpen'"):
        degradation_spec("sharpen")
    with pytest.raises(ValueError, match="quality"):
        degradation_spec("JPEG compression", 0)


def test_tile_size_field():
    assert parse_tile_size("auto") is None and parse_tile_size("") is None and parse_tile_size(None) is None
    assert parse_tile_size(" 64 ") == 64 and parse_tile_size("0") == 0
    with pytest.raises(AppRequestError, match="'auto' or a whole number"):
        parse_tile_size("big")


def test_restore_an_upload_uses_the_models_defaults(app, pipe):
    image = _photo()
    result = app.restore(image, seed=3)
    assert result.scores is None  # no clean reference
    assert result.restored.size == image.size
    with Image.open(result.output_path) as saved:
        assert saved.format == "PNG"
        assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(result.restored.convert("RGB")))
    for name, value in pipe.sampling_defaults.items():
        assert result.settings[name] == value
    # the same call as a user's plain pipe(image) with that seed
    expected = pipe(image, generator=torch.Generator().manual_seed(3)).images[0]
    assert np.array_equal(np.asarray(expected), np.asarray(result.restored))


def test_simulated_degradation_is_scored_against_the_clean_photo(app):
    clean = _photo(seed=1)
    result = app.restore(clean, "Gaussian noise", 25, seed=7)
    expected_degraded, _ = apply_degradation_spec(clean, "gaussian_noise:25", np.random.default_rng(7))
    assert np.array_equal(np.asarray(result.input_image), np.asarray(expected_degraded))
    assert result.settings["simulated_degradation"] == "gaussian_noise:25"
    assert result.scores["degraded"]["psnr"] == pytest.approx(_psnr(expected_degraded, clean), abs=0.01)
    assert result.scores["restored"]["psnr"] == pytest.approx(_psnr(result.restored, clean), abs=0.01)
    assert 0 < result.scores["restored"]["ssim"] <= 1


def test_upscaled_output_has_no_scores_and_respects_the_side_limit(app):
    result = app.restore(_photo(40, 32), "JPEG compression", 20, upscale=2)
    assert result.restored.size == (80, 64)
    assert result.scores is None
    with pytest.raises(AppRequestError, match=r"upscale 4 would make a 160x128 px image; .*at most 128 px per side"):
        app.restore(_photo(40, 32), upscale=4)


def test_bad_requests_are_refused_with_a_message_before_any_work(app, pipe, monkeypatch):
    calls = []
    original = type(pipe).__call__

    @functools.wraps(original)  # keeps the signature that the pipeline's argument check reads
    def recorded(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", recorded)
    with pytest.raises(AppRequestError, match=r"the image is 200x40 px; this app accepts at most 128 px per side"):
        app.restore(_photo(200, 40))
    with pytest.raises(AppRequestError, match="no image"):
        app.restore(None)
    with pytest.raises(AppRequestError, match="degradation: .*kernel"):
        app.restore(_photo(), "Gaussian blur", 4)
    # a setting the pipeline refuses carries the pipeline's own message
    with pytest.raises(ValueError) as expected:
        pipe.check_inputs(tile_size=33)
    with pytest.raises(AppRequestError) as refused:
        app.restore(_photo(), tile_size=33)
    assert str(refused.value) == str(expected.value)
    assert calls == []


def test_cancel_discards_the_half_denoised_result_and_the_next_request_works(app, pipe):
    steps_seen = []

    def on_step(step, total):
        steps_seen.append((step, total))
        if step == 1:
            assert app.cancel("visitor")

    settings = {"num_inference_steps": 4, "fidelity": 0.0}
    assert app.restore(_photo(), session="visitor", on_step=on_step, **settings) is None
    assert pipe.interrupt
    assert steps_seen[0] == (1, 4)
    assert not app.cancel("visitor")  # nothing running any more
    after = app.restore(_photo(), session="visitor", seed=0, **settings)
    fresh = pipe(_photo(), generator=torch.Generator().manual_seed(0), num_inference_steps=4, fidelity=0.0).images[0]
    assert np.array_equal(np.asarray(after.restored), np.asarray(fresh))


def test_a_failing_request_does_not_break_the_next(app, pipe, monkeypatch):
    original = type(pipe).__call__
    failures = iter([True])

    @functools.wraps(original)
    def flaky(self, *args, **kwargs):
        if next(failures, False):
            raise RuntimeError("simulated failure")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", flaky)
    with pytest.raises(RuntimeError, match="simulated failure"):
        app.restore(_photo())
    assert app.restore(_photo()).restored.size == (64, 48)  # the lock was released


def test_one_pipeline_call_at_a_time(app, pipe, monkeypatch):
    original = type(pipe).__call__
    active, most = [0], [0]
    guard = threading.Lock()

    @functools.wraps(original)
    def counted(self, *args, **kwargs):
        with guard:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            return original(self, *args, **kwargs)
        finally:
            with guard:
                active[0] -= 1

    monkeypatch.setattr(type(pipe), "__call__", counted)
    results = [None] * 3
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, app.restore(_photo(seed=i), seed=i)))
               for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(result is not None for result in results)
    assert most[0] == 1


def test_no_degradation_is_the_default(app):
    assert NO_DEGRADATION in DEGRADATION_CHOICES and DEGRADATION_CHOICES[NO_DEGRADATION] is None
    with pytest.raises(ValueError, match="max_image_side"):
        RestorationApp(app.pipe, max_image_side=0)


def test_controls_start_at_the_models_defaults_and_untouched_ones_are_not_passed(pipe, tmp_path, monkeypatch):
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, restoration_guidance_tau=2.5)
    monkeypatch.setattr(pipe, "scheduler", scheduler)
    monkeypatch.setitem(pipe.config, "sampling_defaults", {"num_inference_steps": 3, "guidance_scale": 2.0})
    app = RestorationApp(pipe, output_dir=str(tmp_path))
    start = app.control_defaults
    # restoration_guidance None means "the scheduler's configured strength": the control shows that value
    assert start["num_inference_steps"] == 3 and start["guidance_scale"] == 2.0
    assert start["restoration_guidance"] == 2.5 and start["strength"] == 1.0 and start["upscale"] == 1.0
    # a control left where it started is not passed, so the model's own default (not a copy of it) applies
    assert app.call_arguments(**{name: value for name, value in start.items()}) == {"color_fix": "wavelet"}
    assert app.call_arguments(num_inference_steps=5.0, restoration_guidance=0.0, color_fix="none") == {
        "num_inference_steps": 5, "restoration_guidance": 0.0, "color_fix": None}


def test_the_output_folder_keeps_only_the_newest_pngs(pipe, tmp_path):
    app = RestorationApp(pipe, output_dir=str(tmp_path), keep_outputs=2)
    (tmp_path / "notes.txt").write_text("not ours")
    paths = [app.restore(_photo(32, 32, seed=seed)).output_path for seed in range(4)]
    kept = sorted(path.name for path in tmp_path.iterdir())
    assert kept == sorted([os.path.basename(paths[-2]), os.path.basename(paths[-1]), "notes.txt"])
