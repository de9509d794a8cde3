"""DegradationRemovalModel (the pixel-space first stage) and how the pipeline uses it."""

import json
import os

import numpy as np
import pytest
import torch
from diffusers import SanaPipeline

from diffusers_restore import SanaRestorationPipeline
from diffusers_restore.evaluation import autoencode
from diffusers_restore.models.degradation_removal import DegradationRemovalModel, estimate_noise_level
from diffusers_restore.testing import get_tiny_components

TINY = dict(block_out_channels=(8, 16), layers_per_block=1)


def _trained_like(model: DegradationRemovalModel, seed: int = 0) -> DegradationRemovalModel:
    """Give the zero-initialised output layer weights, so the model is no longer the identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.conv_out.weight.copy_(torch.randn(model.conv_out.weight.shape, generator=generator) * 0.05)
    return model


@pytest.mark.parametrize("height, width", [(1, 1), (7, 13), (32, 32), (33, 70)])
def test_untrained_model_is_the_identity_at_any_size(height, width):
    model = DegradationRemovalModel(**TINY)
    images = torch.rand(2, 3, height, width)
    with torch.no_grad():
        assert torch.equal(model(images), images)


def test_output_has_the_input_shape_and_depends_on_context():
    model = _trained_like(DegradationRemovalModel(**TINY)).eval()
    images = torch.rand(1, 3, 40, 40)
    changed = images.clone()
    changed[:, :, 30:, 30:] = 0.0
    with torch.no_grad():
        out, out_changed = model(images), model(changed)
    assert out.shape == images.shape
    assert not torch.equal(out, images)
    # a change in one corner reaches beyond a single pixel (convolutions), but not the far corner of a 40 px image
    assert (out - out_changed)[:, :, 20:30, 20:30].abs().max() > 0
    assert (out - out_changed)[:, :, :4, :4].abs().max() == 0


def test_bad_input_shapes_raise():
    model = DegradationRemovalModel(**TINY)
    with pytest.raises(ValueError, match="sample"):
        model(torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match="block_out_channels"):
        DegradationRemovalModel(block_out_channels=())


def test_save_and_load_round_trip(tmp_path):
    model = _trained_like(DegradationRemovalModel(**TINY))
    model.save_pretrained(tmp_path)
    loaded = DegradationRemovalModel.from_pretrained(tmp_path)
    images = torch.rand(1, 3, 20, 24)
    with torch.no_grad():
        assert torch.equal(model(images), loaded(images))


def test_weights_save_as_asked_and_load_as_diffusers_loads_them(tmp_path):
    model = _trained_like(DegradationRemovalModel(**TINY))
    model.save_pretrained(tmp_path / "fp16", variant="fp16")
    assert (tmp_path / "fp16" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    model.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert (tmp_path / "pickled" / "diffusion_pytorch_model.bin").is_file()
    loaded = DegradationRemovalModel.from_pretrained(tmp_path / "pickled")  # through torch's weights-only loader
    assert all(torch.equal(value, loaded.state_dict()[key]) for key, value in model.state_dict().items())
    with pytest.raises(OSError, match="diffusion_pytorch_model.safetensors"):
        DegradationRemovalModel.from_pretrained(tmp_path / "pickled", use_safetensors=True)


def _pipeline(with_stage: bool) -> SanaRestorationPipeline:
    pipe = SanaRestorationPipeline.from_sana_pipeline(SanaPipeline(**get_tiny_components(0)))
    pipe.set_sampling_defaults(num_inference_steps=1, guidance_scale=1.0)
    pipe.set_progress_bar_config(disable=True)
    if with_stage:
        pipe.register_modules(degradation_removal=_trained_like(DegradationRemovalModel(**TINY)))
    return pipe


def test_the_pipeline_encodes_and_colour_fixes_against_the_cleaned_image():
    pipe = _pipeline(with_stage=True)
    image = (np.random.default_rng(0).random((24, 28, 3)) * 255).astype(np.uint8)
    conditions = []

    def keep(pipeline, step, timestep, callback_kwargs):
        conditions.append(callback_kwargs["condition_latents"])
        return {}

    pipe(image, output_type="latent", callback_on_step_end=keep, callback_on_step_end_tensor_inputs=["condition_latents"])
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    cleaned = pipe.remove_degradations(pixels)
    assert not torch.allclose(cleaned, pixels)
    # the condition is the cleaned image's autoencoding, not the input's
    expected = autoencode(pipe, cleaned, output_type="pt")
    decoded = pipe._vae_decode(conditions[0], None)[:, :, :24, :28]
    torch.testing.assert_close(decoded, expected, atol=1e-5, rtol=0)


def test_tiled_removal_matches_whole_image_removal():
    pipe = _pipeline(with_stage=True)
    pixels = torch.rand(1, 3, 150, 300)
    whole = pipe.remove_degradations(pixels, tile_size=0)
    tiled = pipe.remove_degradations(pixels, tile_size=64)
    # tiles see less context at their borders; the blend hides it to within a few 8-bit levels
    assert (whole - tiled).abs().mean() < 2e-3


def test_a_pipeline_with_the_stage_saves_and_loads(tmp_path):
    pipe = _pipeline(with_stage=True)
    pipe.save_pretrained(tmp_path)
    with open(tmp_path / "model_index.json") as handle:
        assert json.load(handle)["degradation_removal"] == [
            "diffusers_restore.models.degradation_removal",
            "DegradationRemovalModel",
        ]
    loaded = SanaRestorationPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    image = (np.random.default_rng(1).random((16, 16, 3)) * 255).astype(np.uint8)
    generator = torch.Generator().manual_seed(0)
    first = pipe(image, output_type="np", generator=generator).images
    second = loaded(image, output_type="np", generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_allclose(first, second, atol=1e-5)
    without = _pipeline(with_stage=False)(image, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert np.abs(first - without).max() > 1e-3


def test_evaluate_reports_the_first_stage_alone(tmp_path):
    """`sana-restore evaluate` scores a two-stage pipeline's stage on its own (a row beside the whole pipeline's):
    the row's PSNR is that of `remove_degradations` on the degraded image, computed here independently."""
    from PIL import Image

    from diffusers_restore.cli import main
    from diffusers_restore.evaluation import STAGE_METHOD
    from diffusers_restore.metrics import psnr

    pipe = _pipeline(with_stage=True)
    pipe.save_pretrained(tmp_path / "model")
    os.makedirs(tmp_path / "clean")
    clean = Image.fromarray((np.random.default_rng(1).random((32, 40, 3)) * 255).astype(np.uint8))
    clean.save(tmp_path / "clean" / "a.png")
    assert main(["evaluate", "--model", str(tmp_path / "model"), "--images", str(tmp_path / "clean"),
                 "--degradation", "gaussian_noise:25", "-o", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "results.json").read_text())
    rows = {row["method"]: row for row in report["per_image"]}
    assert set(rows) == {"input", "restored", STAGE_METHOD}
    assert STAGE_METHOD in (tmp_path / "eval" / "results.md").read_text()

    degraded = np.array(Image.open(tmp_path / "eval" / "grids" / "a__gaussian_noise_25.png"))[:, :40]
    pixels = torch.from_numpy(degraded).permute(2, 0, 1)[None].float() / 255.0
    with torch.no_grad():
        stage = pipe.remove_degradations(pixels)
    stage = torch.from_numpy(np.rint(stage[0].permute(1, 2, 0).numpy() * 255.0)).permute(2, 0, 1)[None] / 255.0
    reference = torch.from_numpy(np.asarray(clean)).permute(2, 0, 1)[None].float() / 255.0
    assert rows[STAGE_METHOD]["psnr"] == pytest.approx(float(psnr(stage, reference)), abs=1e-4)
    assert rows[STAGE_METHOD]["psnr"] != pytest.approx(rows["input"]["psnr"], abs=1e-3)  # the stage did something


# ------------------------------------------------------------------------------------------ noise level input


def test_noise_level_estimate_follows_added_gaussian_noise():
    """Donoho's estimator on a smooth image plus gaussian noise of known sigma recovers sigma (independent reference:
    the sigma the noise was drawn with); a smooth image alone gives about 0."""
    generator = torch.Generator().manual_seed(0)
    y, x = torch.meshgrid(torch.linspace(0, 1, 128), torch.linspace(0, 1, 160), indexing="ij")
    smooth = torch.stack([0.2 + 0.6 * x, 0.5 + 0.3 * torch.sin(6 * y), 0.4 * x * y + 0.3])[None]
    assert estimate_noise_level(smooth).item() < 1e-3
    for sigma in (5 / 255, 25 / 255, 50 / 255):
        noisy = smooth + sigma * torch.randn(smooth.shape, generator=generator)
        assert estimate_noise_level(noisy).item() == pytest.approx(sigma, rel=0.05)
    batch = torch.cat([smooth, smooth + 0.1 * torch.randn(smooth.shape, generator=generator)])
    assert estimate_noise_level(batch).shape == (2,)
    with pytest.raises(ValueError, match="images"):
        estimate_noise_level(torch.rand(1, 3, 1, 8))


def test_noise_level_input_is_the_identity_untrained_and_conditions_the_output():
    model = DegradationRemovalModel(**TINY, noise_level_input=True)
    assert model.conv_in.in_channels == 4 * 4
    images = torch.rand(2, 3, 20, 28)
    with torch.no_grad():
        assert torch.equal(model(images), images)
        trained = _trained_like(model)
        estimated, explicit = trained(images), trained(images, noise_level=estimate_noise_level(images))
        other = trained(images, noise_level=torch.tensor([0.0, 0.3]))
    assert torch.allclose(estimated, explicit)
    assert not torch.allclose(estimated, other)
    with pytest.raises(ValueError, match="noise_level"):
        trained(images, noise_level=torch.tensor([0.1]))
    with pytest.raises(ValueError, match="noise_level_input"):
        DegradationRemovalModel(**TINY)(images, noise_level=torch.tensor([0.1, 0.1]))


def test_tiles_of_a_noise_conditioned_stage_get_the_whole_image_level():
    """Tiled removal passes the whole image's noise level to every tile, so a tile's result is the one the whole
    image's level gives (not its own estimate)."""
    pipe = _pipeline(with_stage=False)
    stage = _trained_like(DegradationRemovalModel(**TINY, noise_level_input=True))
    pipe.register_modules(degradation_removal=stage)
    pixels = torch.rand(1, 3, 150, 300)
    pixels[:, :, :, 150:] = 0.5  # half noise, half flat: a tile's own estimate differs from the image's
    seen = []
    forward = stage.forward

    def spy(sample, noise_level=None):
        seen.append(noise_level)
        return forward(sample, noise_level=noise_level)

    stage.forward = spy
    tiled = pipe.remove_degradations(pixels, tile_size=64)
    whole = pipe.remove_degradations(pixels, tile_size=0)
    assert len(seen) > 2
    level = estimate_noise_level(pixels)
    assert all(torch.equal(value, level) for value in seen)
    assert (whole - tiled).abs().mean() < 2e-3


def _photo_like(size: int = 96, seed: int = 0) -> np.ndarray:
    """A smooth random field plus fine texture (a stand-in for a photo: detail at every scale, no 8 x 8 grid)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 11, 11, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    texture = torch.rand(1, 3, size, size, generator=generator)
    return (smooth * 0.8 + texture * 0.2).clamp(0, 1)[0].permute(1, 2, 0).numpy()


def test_blockiness_rises_with_jpeg_compression_and_is_near_zero_without():
    from PIL import Image

    from diffusers_restore.models.degradation_removal import estimate_blockiness

    clean = _photo_like()
    image = Image.fromarray((clean * 255).round().astype(np.uint8))
    as_tensor = lambda picture: torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255).permute(2, 0, 1)[None]  # noqa: E731
    levels = {}
    for quality in (10, 40, 90):
        import io

        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        levels[quality] = estimate_blockiness(as_tensor(Image.open(buffer))).item()
    assert abs(estimate_blockiness(as_tensor(image)).item()) < 0.1
    assert levels[10] > levels[40] > levels[90] and levels[10] > 0.5
    with pytest.raises(ValueError, match="height > 8"):
        estimate_blockiness(torch.rand(1, 3, 8, 20))


def test_detail_ratio_falls_with_blur_and_rises_with_noise():
    from diffusers_restore.models.degradation_removal import estimate_detail_ratio

    image = torch.from_numpy(_photo_like()).permute(2, 0, 1)[None].float()
    blurred = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(image, (1, 1, 1, 1), mode="replicate"), 3, 1)
    noisy = image + 0.1 * torch.randn(image.shape, generator=torch.Generator().manual_seed(0))
    ratios = estimate_detail_ratio(torch.cat([blurred, image, noisy])).tolist()
    assert ratios[0] < ratios[1] < ratios[2]
    # 2 x 2 blocks of equal pixels (a box-filter 2x enlargement) have no finest detail at all
    assert estimate_detail_ratio(torch.nn.functional.interpolate(image, scale_factor=2.0)).item() == 0.0


def test_statistics_input_is_the_identity_untrained_conditions_the_output_and_reaches_every_tile():
    from diffusers_restore.models.degradation_removal import estimate_degradation_statistics

    model = DegradationRemovalModel(**TINY, noise_level_input=True, statistics_input=True)
    assert model.conv_in.in_channels == (3 + 1 + 2) * 4
    images = torch.rand(2, 3, 20, 28)
    with torch.no_grad():
        assert torch.equal(model(images), images)
        trained = _trained_like(model)
        estimated = trained(images)
        explicit = trained(images, **trained.image_conditioning(images))
        other = trained(images, statistics=torch.tensor([[0.0, 0.0], [3.0, 0.2]]))
    assert torch.allclose(estimated, explicit) and not torch.allclose(estimated, other)
    assert set(trained.image_conditioning(images)) == {"noise_level", "statistics"}
    with pytest.raises(ValueError, match="statistics"):
        trained(images, statistics=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="statistics_input"):
        DegradationRemovalModel(**TINY)(images, statistics=torch.zeros(2, 2))

    pipe = _pipeline(with_stage=False)
    pipe.register_modules(degradation_removal=trained)
    pixels = torch.rand(1, 3, 150, 300)
    pixels[:, :, :, 150:] = 0.5
    seen = []
    forward = trained.forward

    def spy(sample, noise_level=None, statistics=None):
        seen.append(statistics)
        return forward(sample, noise_level=noise_level, statistics=statistics)

    trained.forward = spy
    pipe.remove_degradations(pixels, tile_size=64)
    assert len(seen) > 2
    assert all(torch.equal(value, estimate_degradation_statistics(pixels)) for value in seen)
