"""The evaluation harness: the VAE round trip it scores, and strict JSON results."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from diffusers import SanaPipeline

from diffusers_restore import SanaRestorationPipeline
from diffusers_restore.evaluation import EvaluationCase, autoencode, evaluate
from diffusers_restore.testing import get_tiny_components


@pytest.fixture(scope="module")
def pipe():
    pipe = SanaRestorationPipeline.from_sana_pipeline(SanaPipeline(**get_tiny_components(seed=0)))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _photo(height, width, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_autoencode_is_the_vaes_round_trip_of_the_padded_image(pipe):
    image = _photo(21, 30)
    round_trip = autoencode(pipe, image, output_type="np")
    # by hand: [0, 1] -> reflect-pad to whole tokens (24 x 32) -> [-1, 1] -> scaled latents -> decode -> crop
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    padded = F.pad(pixels, (0, 2, 0, 3), mode="reflect") * 2 - 1
    with torch.no_grad():
        latents = pipe.vae.encode(padded).latent * pipe.vae.config.scaling_factor
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    expected = (decoded / 2 + 0.5).clamp(0, 1)[:, :, :21, :30].permute(0, 2, 3, 1).numpy()
    assert round_trip.shape == (1, 21, 30, 3)
    np.testing.assert_allclose(round_trip, expected, atol=1e-5)
    as_pil = autoencode(pipe, PIL.Image.fromarray(image))[0]
    assert isinstance(as_pil, PIL.Image.Image) and as_pil.size == (30, 21)
    np.testing.assert_array_equal(np.asarray(as_pil), np.rint(expected[0] * 255).astype(np.uint8))
    assert not hasattr(pipe, "autoencode")  # an evaluation helper, not a pipeline method


class _Identity:
    """A 'pipeline' that returns its input: every output equals the clean image of a case without degradation."""

    device = torch.device("cpu")

    def __call__(self, image, generator=None, **kwargs):
        return type("Output", (), {"images": [image.copy()]})()


def test_results_json_is_strict_json_with_a_note_when_a_psnr_is_infinite(tmp_path):
    clean = PIL.Image.fromarray(_photo(16, 16))
    cases = [EvaluationCase("same", "none", clean, clean.copy())]
    failures = []
    table = evaluate(_Identity(), cases, str(tmp_path), {}, report=lambda where, error: str(error), failures=failures)
    text = (tmp_path / "results.json").read_text()
    assert "Infinity" not in text and "NaN" not in text

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    results = json.loads(text, parse_constant=refuse)  # RFC 8259: no Infinity / NaN
    restored = next(r for r in results["per_image"] if r["method"] == "restored")
    assert restored["psnr"] is None and restored["ssim"] == pytest.approx(1.0)
    assert results["mean"]["none"]["restored"]["psnr"] is None
    assert "not finite" in results["notes"][0] and "PSNR is infinite" in results["notes"][0]
    assert "| none | restored | 1 | inf |" in table and failures == []
