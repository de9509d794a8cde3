"""Fast checks of examples/train_autoencoder.py: a few steps of a tiny AutoencoderDC on tiny crops."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

pytest.importorskip("skimage", reason="the training photos come from scikit-image")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from diffusers import AutoencoderDC  # noqa: E402

import train_autoencoder  # noqa: E402
from diffusers_restore.sample_photos import VALIDATION_PHOTOS  # noqa: E402


TINY_ARGS = [
    "--resolution", "16",
    "--eval_resolution", "32",
    "--photo_scales", "0.25",
    "--block_out_channels", "8,8,16",
    "--block_types", "ResBlock,ResBlock,EfficientViTBlock",
    "--encoder_layers_per_block", "0,1,1",
    "--decoder_layers_per_block", "0,1,1",
    "--attention_head_dim", "8",
    "--latent_channels", "4",
    "--train_batch_size", "4",
    "--max_train_steps", "60",
    "--lr_warmup_steps", "2",
    "--learning_rate", "1e-2",
    "--validation_steps", "30",
    "--scaling_factor_crops", "8",
    "--num_threads", "1",
]  # fmt: skip


def _run(output_dir, seed: int = 0, extra: list[str] | None = None) -> dict:
    args = train_autoencoder.parse_args(TINY_ARGS + ["--output_dir", str(output_dir), "--seed", str(seed)] + (extra or []))
    torch.set_num_threads(1)
    try:
        return train_autoencoder.main(args)
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny training run shared by the tests: (output_dir, returned metrics)."""
    output_dir = tmp_path_factory.mktemp("ae_run")
    return output_dir, _run(output_dir)


def test_output_folder_loads_with_scaling_factor_and_metrics(trained):
    output_dir, metrics = trained
    vae = AutoencoderDC.from_pretrained(os.path.join(output_dir, "vae"))
    assert os.path.isfile(os.path.join(output_dir, "vae", "diffusion_pytorch_model.safetensors"))
    assert vae.spatial_compression_ratio == 4
    assert vae.config.latent_channels == 4

    # The stored scaling factor is 1 / std of the latents: re-measuring it with the reloaded weights on the same
    # crops gives the same number, and it is not the untouched default of 1.0.
    assert vae.config.scaling_factor == pytest.approx(metrics["scaling_factor"], rel=1e-6)
    assert vae.config.scaling_factor != 1.0
    args = train_autoencoder.parse_args(TINY_ARGS + ["--output_dir", str(output_dir)])
    photos = train_autoencoder.load_training_photos(args.photo_scales, args.resolution)
    stats = train_autoencoder.latent_statistics(vae, photos, args.scaling_factor_crops, args.resolution, args.seed + 1)
    assert stats["scaling_factor"] == pytest.approx(vae.config.scaling_factor, rel=1e-5)
    # On other training crops the scaled latents have roughly unit spread.
    other = train_autoencoder.latent_statistics(vae, photos, 16, args.resolution, seed=123)
    assert 0.5 < other["std"] * vae.config.scaling_factor < 2.0

    with open(os.path.join(output_dir, "vae_metrics.json")) as file:
        saved = json.load(file)
    psnr = saved["validation_psnr"]
    assert set(psnr) == set(VALIDATION_PHOTOS) | {"mean"}
    assert all(math.isfinite(value) for value in psnr.values())
    assert psnr["mean"] == pytest.approx(sum(psnr[name] for name in VALIDATION_PHOTOS) / len(VALIDATION_PHOTOS))
    assert [point["step"] for point in saved["curve"]] == [30, 60]
    assert saved["curve"][-1]["psnr_mean"] == pytest.approx(psnr["mean"])
    assert saved["scaling_factor"] == pytest.approx(vae.config.scaling_factor)
    assert saved["num_parameters"] == sum(p.numel() for p in vae.parameters())

    # The saved weights reproduce the reported validation PSNR exactly.
    validation_photos = train_autoencoder.load_photos(None, VALIDATION_PHOTOS)
    assert train_autoencoder.evaluate_validation(vae, 32, validation_photos) == pytest.approx(psnr)


def test_training_improves_on_the_untrained_model(trained):
    _, metrics = trained
    args = train_autoencoder.parse_args(TINY_ARGS + ["--output_dir", "unused"])
    torch.manual_seed(args.seed)
    untrained = train_autoencoder.build_autoencoder(args)
    validation_photos = train_autoencoder.load_photos(None, VALIDATION_PHOTOS)
    before = train_autoencoder.evaluate_validation(untrained, args.eval_resolution, validation_photos)["mean"]
    assert metrics["validation_psnr"]["mean"] > before + 3.0


def test_same_seed_gives_identical_weights_and_other_seed_does_not(trained, tmp_path):
    output_dir, _ = trained
    reference = AutoencoderDC.from_pretrained(os.path.join(output_dir, "vae")).state_dict()

    _run(tmp_path / "same", seed=0)
    same = AutoencoderDC.from_pretrained(os.path.join(tmp_path / "same", "vae")).state_dict()
    assert reference.keys() == same.keys()
    assert all(torch.equal(reference[key], same[key]) for key in reference)

    _run(tmp_path / "other", seed=1, extra=["--max_train_steps", "2", "--validation_steps", "0"])
    other = AutoencoderDC.from_pretrained(os.path.join(tmp_path / "other", "vae")).state_dict()
    assert any(not torch.equal(reference[key], other[key]) for key in reference)


def test_zero_init_makes_every_residual_block_the_identity():
    from diffusers.models.autoencoders.autoencoder_dc import EfficientViTBlock, ResBlock

    args = train_autoencoder.parse_args(TINY_ARGS + ["--output_dir", "unused"])
    torch.manual_seed(0)
    vae = train_autoencoder.build_autoencoder(args)
    blocks = [m for m in vae.modules() if isinstance(m, (ResBlock, EfficientViTBlock))]
    assert {type(m) for m in blocks} == {ResBlock, EfficientViTBlock}

    def channels(block) -> int:
        return block.conv1.in_channels if isinstance(block, ResBlock) else block.attn.to_q.in_features

    inputs = [torch.randn(2, channels(block), 8, 8) for block in blocks]
    with torch.no_grad():
        # The default initialisation is not the identity ...
        assert all(not torch.equal(block(x), x) for block, x in zip(blocks, inputs))
        train_autoencoder.zero_init_residual_branches(vae)
        # ... the zero-initialised one is, exactly.
        assert all(torch.equal(block(x), x) for block, x in zip(blocks, inputs))
    # The decoder's output norm is on the main path and keeps its scale.
    assert torch.equal(vae.decoder.norm_out.weight, torch.ones_like(vae.decoder.norm_out.weight))


def test_psnr_helper_matches_the_definition():
    reference = torch.zeros(3, 4, 4) - 1.0  # black in [-1, 1]
    restored = reference.clone()
    assert train_autoencoder.psnr_uint8(restored, reference) == math.inf
    restored[0, 0, 0] = -1.0 + 10.0 / 127.5  # one value off by 10 grey levels
    expected = 10.0 * math.log10(255.0**2 / (10.0**2 / 48))
    assert train_autoencoder.psnr_uint8(restored, reference) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("extra", "argument"),
    [
        (["--latent_channels", "5"], "--latent_channels"),
        (["--block_types", "ResBlock,Attention,ResBlock"], "--block_types"),
        (["--block_types", "ResBlock,ResBlock"], "--block_types"),
        (["--resolution", "18"], "--resolution"),
        (["--attention_head_dim", "3"], "--attention_head_dim"),
        (["--encoder_layers_per_block", "1,0,1"], "--encoder_layers_per_block"),
        (["--loss", "ssim"], "--loss"),
        (["--photo_scales", "1.5"], "--photo_scales"),
        (["--max_train_steps", "0"], "--max_train_steps"),
    ],
)
def test_bad_arguments_raise_a_clear_error(extra, argument):
    with pytest.raises(ValueError, match=argument):
        train_autoencoder.parse_args(TINY_ARGS + ["--output_dir", "unused"] + extra)


def test_photo_folders_replace_the_sample_photos(tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, names in (("train", ("a", "b")), ("validation", ("c",))):
        (tmp_path / split / "sub").mkdir(parents=True)
        for name in names:
            array = (rng.random((80, 96, 3)) * 255).astype(np.uint8)
            Image.fromarray(array).save(tmp_path / split / "sub" / f"{name}.png")
    metrics = _run(tmp_path / "out", extra=["--train_data_dir", str(tmp_path / "train"), "--validation_data_dir",
                                           str(tmp_path / "validation"), "--max_train_steps", "2",
                                           "--validation_steps", "0"])
    assert set(metrics["validation_psnr"]) == {os.path.join("sub", "c"), "mean"}
    with pytest.raises(ValueError, match="does not exist"):
        _run(tmp_path / "out2", extra=["--train_data_dir", str(tmp_path / "missing")])
