# Copyright 2026 The diffusers-restore authors. Licensed under the Apache License, Version 2.0.
"""Tests of examples/train_decoder.py on the tiny offline SANA kit (CPU, no network)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderDC, SanaPipeline  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from diffusers_restore import DCUpscaleDecoder, SanaRestorationPipeline, install_decoder  # noqa: E402
from diffusers_restore.testing import get_tiny_components  # noqa: E402

SCRIPT = Path(__file__).resolve().parent / "train_decoder.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("train_decoder", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_decoder"] = module
    spec.loader.exec_module(module)
    return module


train_decoder = _load_script()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def restorer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("restorer")
    SanaRestorationPipeline.from_sana_pipeline(SanaPipeline(**get_tiny_components(0))).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Six smooth synthetic 'photos' (random low-frequency colour fields with an edge), one of them large enough to
    be area-downsampled first."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for index, size in enumerate([48, 48, 56, 64, 72, 96]):
        coarse = rng.random((4, 4, 3)) * 255
        image = Image.fromarray(coarse.astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
        array = np.asarray(image).copy()
        array[:, size // 2 :] //= 2
        Image.fromarray(array).save(folder / f"photo_{index}.png")
    return folder


def _args(restorer, photos, output_dir, *extra):
    return train_decoder.parse_args([
        "--pretrained_model_name_or_path", str(restorer),
        "--train_data_dir", str(photos),
        "--validation_data_dir", str(photos),
        "--num_validation_images", "2",
        "--output_dir", str(output_dir),
        "--resolution", "32",
        "--train_batch_size", "2",
        "--learning_rate", "1e-3",
        "--checkpointing_steps", "2",
        "--validation_steps", "2",
        "--report_to", "none",
        "--seed", "0",
        *extra,
    ])  # fmt: skip


def test_upscale_1_fine_tunes_only_the_decoder_and_saves_a_plain_vae(restorer, photos, tmp_path):
    args = _args(restorer, photos, tmp_path / "run", "--max_train_steps", "4", "--use_ema", "--random_flip",
                 "--gradient_checkpointing", "--gan_loss_weight", "0.5", "--gan_start_step", "2")
    result = train_decoder.main(args)
    base = load_file(Path(restorer) / "vae" / "diffusion_pytorch_model.safetensors")
    tuned = AutoencoderDC.from_pretrained(tmp_path / "run" / "vae")
    state = tuned.state_dict()
    assert all(torch.equal(state[key], value) for key, value in base.items() if key.startswith("encoder."))
    assert any(not torch.equal(state[key], value) for key, value in base.items() if key.startswith("decoder."))
    assert all(torch.isfinite(value).all() for value in state.values())
    assert set(result["final"]) == {f"{m}_sigma_{s:g}" for m in ("psnr", "ssim") for s in (0, 0.03, 0.06, 0.12)}
    card = (tmp_path / "run" / "README.md").read_text()
    assert "robust to degraded latents" in card and "install-decoder" in card
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert list((tmp_path / "run" / "validation").glob("step_000004_*.png"))
    # the swapped pipeline loads unchanged and restores
    install_decoder(str(restorer), str(tmp_path / "run"), str(tmp_path / "swapped"))
    pipe = SanaRestorationPipeline.from_pretrained(tmp_path / "swapped")
    assert torch.equal(pipe.vae.decoder.conv_in.weight, tuned.decoder.conv_in.weight)
    assert pipe(Image.open(photos / "photo_0.png"), num_inference_steps=1).images[0].size == (48, 48)


def test_a_grown_decoder_trains_saves_as_a_plain_vae_and_goes_into_a_pipeline(restorer, photos, tmp_path):
    args = _args(restorer, photos, tmp_path / "run", "--max_train_steps", "2", "--decoder_extra_layers", "0,1,2")
    result = train_decoder.main(args)
    tuned = AutoencoderDC.from_pretrained(tmp_path / "run" / "vae")
    assert list(tuned.config.decoder_layers_per_block) == [1, 2, 3]
    base = AutoencoderDC.from_pretrained(Path(restorer) / "vae")
    state = tuned.state_dict()
    assert all(torch.equal(state[key], value) for key, value in base.state_dict().items() if key.startswith("encoder."))
    # training starts from the base decoder's exact decode (the new blocks are the identity at first)
    assert result["base"] == json.loads((tmp_path / "run" / "base_decoder_metrics.json").read_text())
    untrained = train_decoder.grow_dc_decoder(base, [0, 1, 2])
    with torch.no_grad():
        latents = torch.randn(1, base.config.latent_channels, 4, 4)
        assert torch.equal(untrained.decode(latents).sample, base.decode(latents).sample)
    install_decoder(str(restorer), str(tmp_path / "run"), str(tmp_path / "swapped"))
    pipe = SanaRestorationPipeline.from_pretrained(tmp_path / "swapped")
    assert list(pipe.vae.config.decoder_layers_per_block) == [1, 2, 3]
    assert pipe(Image.open(photos / "photo_0.png"), num_inference_steps=1).images[0].size == (48, 48)
    # a checkpoint of a grown decoder does not resume into a run with another shape, and says why
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    with pytest.raises(ValueError, match=r"--decoder_extra_layers \[0, 1, 2\]"):
        train_decoder.main(_args(restorer, photos, tmp_path / "run", "--max_train_steps", "3",
                                 "--resume_from_checkpoint", "latest"))
    with pytest.raises(ValueError, match="comma-separated integers"):
        _args(restorer, photos, tmp_path, "--decoder_extra_layers", "0,x,1")


def test_clean_latent_prob_leaves_that_share_of_latents_clean():
    latents = torch.randn(400, 4, 2, 2)
    inputs = torch.zeros(400, 3, 8, 8)

    def degrade(prob):
        args = argparse.Namespace(
            latent_degradation="noise", latent_noise_max=0.12, clean_latent_prob=prob)
        return train_decoder.degrade_input_latents(args, latents, inputs, torch.Generator().manual_seed(0), None)

    noisy, sigmas = degrade(0.0)
    assert (sigmas > 0).all() and not torch.equal(noisy, latents)
    all_clean, sigmas = degrade(1.0)
    assert torch.equal(all_clean, latents) and (sigmas == 0).all()
    mixed, sigmas = degrade(0.25)
    clean = (mixed == latents).flatten(1).all(1)
    assert torch.equal(clean, sigmas == 0)
    assert 0.18 < clean.float().mean() < 0.32  # 400 draws of p = 0.25


def test_balanced_l1_weighs_samples_by_the_original_decoders_error():
    target = torch.zeros(2, 3, 4, 4)
    prediction = torch.stack([torch.full((3, 4, 4), 0.1), torch.full((3, 4, 4), 0.3)])
    equal_reference = torch.full((2, 3, 4, 4), 0.5)
    assert torch.allclose(train_decoder.balanced_l1(prediction, target, equal_reference), torch.tensor(0.2))
    # the first sample was decoded 3x better by the original decoder: it weighs 3x more (weights 1.5 and 0.5)
    reference = torch.stack([torch.full((3, 4, 4), 0.1), torch.full((3, 4, 4), 0.3)])
    assert torch.allclose(train_decoder.balanced_l1(prediction, target, reference), torch.tensor(0.15))


def test_balanced_noise_levels_and_clean_latents_train(restorer, photos, tmp_path):
    result = train_decoder.main(_args(restorer, photos, tmp_path / "run", "--max_train_steps", "2",
                                      "--balance_noise_levels", "--clean_latent_prob", "0.5",
                                      "--decoder_extra_layers", "0,0,1"))
    assert result["final"] and (tmp_path / "run" / "vae" / "config.json").is_file()
    card = (tmp_path / "run" / "README.md").read_text()
    assert "deepened by [0, 0, 1]" in card and "clean latents: 0.5" in card and "inverse of the original" in card
    with pytest.raises(ValueError, match="--balance_noise_levels needs --upscale 1"):
        _args(restorer, photos, tmp_path, "--balance_noise_levels", "--upscale", "2")
    with pytest.raises(ValueError, match="--clean_latent_prob must be in"):
        _args(restorer, photos, tmp_path, "--clean_latent_prob", "1.5")


def test_resuming_reproduces_the_uninterrupted_run(restorer, photos, tmp_path):
    common = ("--use_ema", "--gan_loss_weight", "0.5", "--gan_start_step", "1", "--perceptual_loss_weight", "0.2")
    train_decoder.main(_args(restorer, photos, tmp_path / "straight", "--max_train_steps", "4", *common))
    from accelerate.state import AcceleratorState, GradientState

    train_decoder.main(_args(restorer, photos, tmp_path / "cut", "--max_train_steps", "2", *common))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    train_decoder.main(_args(restorer, photos, tmp_path / "cut", "--max_train_steps", "4",
                             "--resume_from_checkpoint", "latest", *common))
    straight = load_file(tmp_path / "straight" / "vae" / "diffusion_pytorch_model.safetensors")
    resumed = load_file(tmp_path / "cut" / "vae" / "diffusion_pytorch_model.safetensors")
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_upscale_2_trains_an_upscale_decoder_that_the_pipeline_uses(restorer, photos, tmp_path):
    args = _args(restorer, photos, tmp_path / "run", "--max_train_steps", "3", "--upscale", "2",
                 "--upscale_decoder_head_channels", "8", "--upscale_decoder_head_layers", "1")
    result = train_decoder.main(args)
    decoder = DCUpscaleDecoder.from_pretrained(tmp_path / "run" / "upscale_decoder")
    assert decoder.config.upscale_factor == 2 and decoder.config.head_channels == 8
    assert result["base"]["psnr_sigma_0"] != result["final"]["psnr_sigma_0"]
    install_decoder(str(restorer), str(tmp_path / "run"), str(tmp_path / "swapped"))
    pipe = SanaRestorationPipeline.from_pretrained(tmp_path / "swapped")
    assert pipe(Image.open(photos / "photo_0.png"), upscale=2, num_inference_steps=1).images[0].size == (96, 96)


def test_restorer_latent_degradation_runs(restorer, photos, tmp_path):
    args = _args(restorer, photos, tmp_path / "run", "--max_train_steps", "1", "--latent_degradation", "restorer",
                 "--restorer_strength_max", "0.3", "--perceptual_loss_weight", "0")
    train_decoder.main(args)
    assert (tmp_path / "run" / "vae" / "diffusion_pytorch_model.safetensors").is_file()


def test_divergence_stops_without_writing_a_decoder(restorer, photos, tmp_path):
    args = _args(restorer, photos, tmp_path / "run", "--max_train_steps", "6", "--learning_rate", "1e30",
                 "--max_grad_norm", "0", "--checkpointing_steps", "100")
    with pytest.raises(train_decoder.NonFiniteError, match="diverged|NaN"):
        train_decoder.main(args)
    assert not (tmp_path / "run" / "vae").exists()
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_bad_arguments_are_named(restorer, photos, tmp_path):
    with pytest.raises(ValueError, match="--upscale 2 needs an even --resolution"):
        _args(restorer, photos, tmp_path, "--upscale", "2", "--resolution", "33")
    with pytest.raises(ValueError, match="--train_data_dir"):
        train_decoder.parse_args(["--pretrained_model_name_or_path", str(restorer), "--train_data_dir",
                                  str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="multiple of the VAE's factor 4"):
        train_decoder.main(_args(restorer, photos, tmp_path / "a", "--resolution", "30"))
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    with pytest.raises(ValueError, match=r"photo_0.png \(48x48\)"):
        train_decoder.main(_args(restorer, photos, tmp_path / "b", "--resolution", "52"))


def test_metrics_file_and_base_metrics(restorer, photos, tmp_path):
    train_decoder.main(_args(restorer, photos, tmp_path / "run", "--max_train_steps", "2", "--latent_noise_max", "0.5"))
    metrics = json.loads((tmp_path / "run" / "decoder_metrics.json").read_text())
    base = json.loads((tmp_path / "run" / "base_decoder_metrics.json").read_text())
    assert metrics["base"] == base and metrics["upscale"] == 1
    # more latent noise decodes worse, with the base decoder
    assert base["psnr_sigma_0"] > base["psnr_sigma_0.12"]


def test_push_to_hub_uploads_the_decoder_without_checkpoints(restorer, photos, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from hub_server import LocalHubServer, hub_endpoint

    output_dir = tmp_path / "robust-decoder"
    with LocalHubServer(require_token=True) as server, hub_endpoint(server.url):
        train_decoder.main(_args(restorer, photos, output_dir, "--max_train_steps", "2", "--push_to_hub",
                                 "--hub_token", "hf_test"))
        repo = server.repo_path("local-user/robust-decoder")
        uploaded = {p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()}
        assert not server.errors
    local = {p.relative_to(output_dir).as_posix() for p in output_dir.rglob("*") if p.is_file()}
    assert "checkpoint-2/training_state.json" in local
    assert uploaded == {path for path in local if not path.startswith("checkpoint-")}
    assert {"README.md", "vae/diffusion_pytorch_model.safetensors", "decoder_metrics.json"} <= uploaded
