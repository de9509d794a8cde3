"""DCUpscaleDecoder, the pipeline's `upscale_decoder` path, and `install_decoder` (putting a trained decoder into a
pipeline folder)."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import SanaPipeline
from PIL import Image

from diffusers_restore import DCUpscaleDecoder, SanaRestorationPipeline, install_decoder
from diffusers_restore.models.upscale_decoder import run_dc_decoder
from diffusers_restore.testing import get_tiny_components, get_tiny_vae


def _trained_like(decoder: DCUpscaleDecoder, seed: int = 0) -> DCUpscaleDecoder:
    """Give the zero-initialised head output weights, so the decoder is no longer the resized VAE decode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        decoder.head_out.weight.copy_(torch.randn(decoder.head_out.weight.shape, generator=generator) * 0.05)
    return decoder


def _pipeline(seed: int = 0) -> SanaRestorationPipeline:
    pipe = SanaRestorationPipeline.from_sana_pipeline(SanaPipeline(**get_tiny_components(seed)))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _folder_digest(folder) -> str:
    digest = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, folder).encode())
            with open(path, "rb") as handle:
                digest.update(handle.read())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------------ the model


def test_run_dc_decoder_is_the_vae_decode():
    vae = get_tiny_vae(0)
    latents = torch.randn(2, vae.config.latent_channels, 6, 5)
    with torch.no_grad():
        assert torch.equal(run_dc_decoder(vae.decoder, latents), vae.decode(latents).sample)


def test_a_new_upscale_decoder_is_the_vae_decode_resized_bilinearly():
    vae = get_tiny_vae(0)
    decoder = DCUpscaleDecoder.from_vae(vae)
    latents = torch.randn(2, vae.config.latent_channels, 6, 5)
    with torch.no_grad():
        reference = F.interpolate(vae.decode(latents).sample, scale_factor=2, mode="bilinear", align_corners=False)
        output = decoder(latents).sample
    assert output.shape == (2, 3, 6 * 8, 5 * 8) and decoder.spatial_compression_ratio == 8
    torch.testing.assert_close(output, reference, rtol=0, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_output_and_gradients():
    decoder = _trained_like(DCUpscaleDecoder.from_vae(get_tiny_vae(0)))
    latents = torch.randn(2, 4, 4, 4)

    def gradients():
        decoder.zero_grad()
        output = decoder(latents).sample
        output.square().mean().backward()
        return output.detach(), [p.grad.clone() for p in decoder.parameters()]

    plain_output, plain_grads = gradients()
    decoder.enable_gradient_checkpointing()
    checkpointed_output, checkpointed_grads = gradients()
    assert torch.equal(plain_output, checkpointed_output)
    for plain, checkpointed in zip(plain_grads, checkpointed_grads):
        torch.testing.assert_close(plain, checkpointed, rtol=0, atol=1e-7)


def test_save_load_round_trip_and_bad_arguments(tmp_path):
    decoder = _trained_like(DCUpscaleDecoder.from_vae(get_tiny_vae(0)))
    decoder.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "diffusion_pytorch_model.safetensors")
    loaded = DCUpscaleDecoder.from_pretrained(tmp_path)
    latents = torch.randn(1, 4, 3, 3)
    with torch.no_grad():
        assert torch.equal(loaded(latents).sample, decoder(latents).sample)
    with pytest.raises(OSError, match="diffusion_pytorch_model.bin"):  # diffusers' meaning: the pickle, not this
        DCUpscaleDecoder.from_pretrained(tmp_path, use_safetensors=False)
    with pytest.raises(ValueError, match="power of 2"):
        DCUpscaleDecoder(upscale_factor=3)
    with pytest.raises(TypeError, match="AutoencoderDC"):
        DCUpscaleDecoder.from_vae(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="latents"):
        loaded(torch.randn(1, 3, 3, 3))


# ------------------------------------------------------------------------------------------------------ the pipeline


@pytest.fixture
def upscaling_pipeline():
    pipe = _pipeline()
    pipe.upscale_decoder = None
    pipe.register_modules(upscale_decoder=_trained_like(DCUpscaleDecoder.from_vae(pipe.vae)).eval())
    return pipe


def test_upscale_two_denoises_at_the_input_size_and_decodes_with_the_upscale_decoder(upscaling_pipeline):
    pipe = upscaling_pipeline
    image = torch.rand(1, 3, 24, 32)
    seen = []

    def callback(pipeline, step, timestep, tensors):
        seen.append(tuple(tensors["latents"].shape))
        return {}

    kwargs = dict(num_inference_steps=2, guidance_scale=1.0, color_fix=None, generator=torch.Generator().manual_seed(0))
    output = pipe(image, upscale=2, output_type="pt", callback_on_step_end=callback, **kwargs).images
    assert output.shape == (1, 3, 48, 64)
    assert seen[0] == (1, 4, 6, 8)  # the input's latent (f4), not the 2x image's
    latents = pipe(image, upscale=2, output_type="latent", **dict(kwargs, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        decoded = pipe.upscale_decoder(latents.images / pipe.vae.config.scaling_factor).sample
    torch.testing.assert_close(output, (decoded / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-6)
    # other factors keep the resize-first path (and never touch the upscale decoder)
    assert pipe(image, upscale=1.5, output_type="pt", **kwargs).images.shape == (1, 3, 36, 48)


def test_upscale_decoder_and_fidelity(upscaling_pipeline):
    image = torch.rand(1, 3, 16, 16)
    kwargs = dict(num_inference_steps=1, guidance_scale=1.0, output_type="pt")
    with pytest.raises(ValueError, match="fidelity"):
        upscaling_pipeline(image, upscale=2, fidelity=0.5, **kwargs)
    # a model default of fidelity > 0 does not apply to the upscale decoder's output (and does not fail)
    upscaling_pipeline.set_sampling_defaults(fidelity=1.0)
    assert upscaling_pipeline(image, upscale=2, **kwargs).images.shape == (1, 3, 32, 32)


def test_upscale_decoder_tiles_match_the_whole_image(upscaling_pipeline):
    image = torch.rand(1, 3, 48, 48)
    kwargs = dict(num_inference_steps=1, guidance_scale=1.0, output_type="pt", upscale=2)
    whole = upscaling_pipeline(image, tile_size=0, generator=torch.Generator().manual_seed(0), **kwargs).images
    tiled = upscaling_pipeline(image, tile_size=32, generator=torch.Generator().manual_seed(0), **kwargs).images
    assert tiled.shape == whole.shape == (1, 3, 96, 96)
    # the tiny transformer's attention differs per tile; blending keeps the result close to the untiled one
    assert (tiled - whole).abs().mean() < 0.05


def test_pipeline_with_an_upscale_decoder_round_trips(tmp_path, upscaling_pipeline):
    upscaling_pipeline.save_pretrained(tmp_path / "pipe")
    with open(tmp_path / "pipe" / "model_index.json") as handle:
        assert json.load(handle)["upscale_decoder"][1] == "DCUpscaleDecoder"
    loaded = SanaRestorationPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(loaded.upscale_decoder, DCUpscaleDecoder)
    for (name, a), (_, b) in zip(upscaling_pipeline.upscale_decoder.state_dict().items(),
                                 loaded.upscale_decoder.state_dict().items()):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------------------------------------------ install_decoder


@pytest.fixture
def pipeline_folder(tmp_path):
    folder = tmp_path / "restorer"
    _pipeline().save_pretrained(folder)
    return folder


def test_install_a_fine_tuned_vae(tmp_path, pipeline_folder):
    pipe = SanaRestorationPipeline.from_pretrained(pipeline_folder)
    with torch.no_grad():
        pipe.vae.decoder.conv_out.weight.mul_(0.5)  # "fine-tuned": the decoder changed, the encoder did not
    pipe.vae.save_pretrained(tmp_path / "decoder_run" / "vae")
    before = _folder_digest(pipeline_folder), _folder_digest(tmp_path / "decoder_run")

    output = install_decoder(str(pipeline_folder), str(tmp_path / "decoder_run"), str(tmp_path / "new"))
    assert (_folder_digest(pipeline_folder), _folder_digest(tmp_path / "decoder_run")) == before  # inputs untouched
    loaded = SanaRestorationPipeline.from_pretrained(output)
    assert torch.equal(loaded.vae.decoder.conv_out.weight, pipe.vae.decoder.conv_out.weight)
    assert loaded.upscale_decoder is None
    assert "fine-tuned VAE decoder" in (tmp_path / "new" / "README.md").read_text()
    restored = loaded(Image.new("RGB", (16, 16), (90, 120, 60)), num_inference_steps=1).images[0]
    assert restored.size == (16, 16)


def test_install_an_upscale_decoder_then_restore_at_2x(tmp_path, pipeline_folder):
    vae = SanaRestorationPipeline.from_pretrained(pipeline_folder).vae
    _trained_like(DCUpscaleDecoder.from_vae(vae)).save_pretrained(tmp_path / "run" / "upscale_decoder")
    (tmp_path / "run" / "decoder_metrics.json").write_text(json.dumps({"final": {"psnr_sigma_0": 31.5}}))
    install_decoder(str(pipeline_folder), str(tmp_path / "run"), str(tmp_path / "new"))
    loaded = SanaRestorationPipeline.from_pretrained(tmp_path / "new")
    assert isinstance(loaded.upscale_decoder, DCUpscaleDecoder)
    card = (tmp_path / "new" / "README.md").read_text()
    assert "upscale decoder" in card and "31.50 dB" in card
    assert loaded(Image.new("RGB", (20, 12)), upscale=2, num_inference_steps=1).images[0].size == (40, 24)


def test_install_a_deeper_decoder(tmp_path, pipeline_folder):
    from diffusers_restore.models.dc_decoder_growth import grow_dc_decoder

    pipe = SanaRestorationPipeline.from_pretrained(pipeline_folder)
    grown = grow_dc_decoder(pipe.vae, [0, 1, 1])
    grown.save_pretrained(tmp_path / "deeper")
    install_decoder(str(pipeline_folder), str(tmp_path / "deeper"), str(tmp_path / "new"))
    loaded = SanaRestorationPipeline.from_pretrained(tmp_path / "new")
    assert list(loaded.vae.config.decoder_layers_per_block) == [1, 2, 2]
    assert "deeper VAE decoder" in (tmp_path / "new" / "README.md").read_text()
    image = Image.new("RGB", (16, 16), (90, 120, 60))
    # the new blocks start as the identity, so until trained the pipeline restores exactly as before
    before = pipe(image, num_inference_steps=1, output_type="np", generator=torch.manual_seed(0)).images
    after = loaded(image, num_inference_steps=1, output_type="np", generator=torch.manual_seed(0)).images
    assert np.array_equal(before, after)


def test_install_decoder_refuses_what_would_break_the_restorer(tmp_path, pipeline_folder):
    other = get_tiny_vae(seed=1)  # another encoder: the restorer's latents would change
    other.save_pretrained(tmp_path / "other_vae")
    with pytest.raises(ValueError, match="another encoder"):
        install_decoder(str(pipeline_folder), str(tmp_path / "other_vae"), str(tmp_path / "new"))
    get_tiny_vae(0, latent_channels=8).save_pretrained(tmp_path / "other_latents")
    with pytest.raises(ValueError, match="differs from the pipeline's .* in .*latent_channels"):
        install_decoder(str(pipeline_folder), str(tmp_path / "other_latents"), str(tmp_path / "new"))
    fewer_stages = get_tiny_vae(0)
    fewer_stages.register_to_config(decoder_block_out_channels=[8, 16])  # as a hand-edited config would say
    fewer_stages.save_pretrained(tmp_path / "fewer_stages")
    with pytest.raises(ValueError, match="decoder of 2 stages"):
        install_decoder(str(pipeline_folder), str(tmp_path / "fewer_stages"), str(tmp_path / "new"))
    bigger = DCUpscaleDecoder.from_vae(get_tiny_vae(0, latent_channels=8))
    bigger.save_pretrained(tmp_path / "bigger")
    with pytest.raises(ValueError, match="latent_channels"):
        install_decoder(str(pipeline_folder), str(tmp_path / "bigger"), str(tmp_path / "new"))
    with pytest.raises(ValueError, match="neither"):
        install_decoder(str(pipeline_folder), str(tmp_path), str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()

    SanaRestorationPipeline.from_pretrained(pipeline_folder).vae.save_pretrained(tmp_path / "same_vae")
    with pytest.raises(ValueError, match="overlaps"):
        install_decoder(str(pipeline_folder), str(tmp_path / "same_vae"), str(pipeline_folder))
    (tmp_path / "taken").mkdir()
    with pytest.raises(ValueError, match="exists"):
        install_decoder(str(pipeline_folder), str(tmp_path / "same_vae"), str(tmp_path / "taken"))
    install_decoder(str(pipeline_folder), str(tmp_path / "same_vae"), str(tmp_path / "taken"), overwrite=True)
    assert (tmp_path / "taken" / "model_index.json").is_file()


def test_cli_install_decoder_reports_errors_with_exit_2(tmp_path, pipeline_folder):
    command = [sys.executable, "-m", "diffusers_restore.cli", "install-decoder", str(pipeline_folder)]
    result = subprocess.run(command + [str(tmp_path / "missing"), "-o", str(tmp_path / "new")],
                            capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 2 and "neither" in result.stderr, result.stderr
    assert not (tmp_path / "new").exists()


def test_images_from_numpy_are_accepted_at_2x(upscaling_pipeline):
    image = np.random.default_rng(0).random((20, 28, 3)).astype(np.float32)
    out = upscaling_pipeline(image, upscale=2, num_inference_steps=1, output_type="np").images
    assert out.shape == (1, 40, 56, 3)
