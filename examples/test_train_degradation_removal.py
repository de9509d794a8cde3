# Copyright 2026 The diffusers-restore authors. Licensed under the Apache License, Version 2.0.
"""Tests of examples/train_degradation_removal.py on the tiny offline SANA kit (CPU, no network)."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_restore import SanaRestorationPipeline
from test_train_paired import (  # noqa: F401 - fixtures
    _assert_same_weights,
    _checkpoints,
    _fresh_accelerate_state,
    _one_thread,
    _reset_accelerate,
    _weights,
    pair_data,
    tiny_base,
)

SCRIPT = Path(__file__).resolve().parent / "train_degradation_removal.py"
spec = importlib.util.spec_from_file_location("train_degradation_removal", SCRIPT)
train_degradation_removal = importlib.util.module_from_spec(spec)
sys.modules["train_degradation_removal"] = train_degradation_removal
spec.loader.exec_module(train_degradation_removal)

# a small stage, so that its runs cost little
SMALL_STAGE = ["--block_out_channels", "8,16", "--layers_per_block", 1]
TRAINING = ["--max_train_steps", 32, "--checkpointing_steps", 16, "--train_batch_size", 3, "--use_ema",
            "--ema_decay", 0.9, "--learning_rate", 3e-3]


def _args(base, pair_data, output_dir, *extra) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(base),
        "--train_data_csv", str(pair_data / "pairs.csv"),
        "--output_dir", str(output_dir),
        "--resolution", "32",
        "--seed", "0",
        "--report_to", "none",
        *map(str, extra),
    ]


def _run(args: list[str]) -> None:
    train_degradation_removal.main(train_degradation_removal.parse_args(args))


def _with_max_steps(args: list[str], steps: int) -> list[str]:
    index = args.index("--max_train_steps")
    return args[: index + 1] + [str(steps)] + args[index + 2 :]


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
    """A new stage on the plain SANA kit: 32 steps with EMA, checkpoints every 16 steps and a validation at the end."""
    output_dir = tmp_path_factory.mktemp("stage") / "out"
    args = _args(tiny_base, pair_data, output_dir, *SMALL_STAGE, *TRAINING,
                 "--validation_image", pair_data / "noisy1.png",
                 "--validation_target_image", pair_data / "clean" / "1.png", "--validation_steps", 100)
    _run(args)
    _reset_accelerate()
    return {"output_dir": output_dir, "args": args}


def test_the_stage_trains_and_ships_in_the_pipeline(stage_run, tiny_base, pair_data):
    from diffusers_restore.models.degradation_removal import DegradationRemovalModel

    out = stage_run["output_dir"]
    assert _checkpoints(out) == {"checkpoint-16", "checkpoint-32"}
    assert json.loads((out / "checkpoint-32" / "training_state.json").read_text())["trained_component"] == (
        "degradation_removal")
    # the saved pipeline is the base's with the trained stage (its EMA weights); the transformer is untouched
    _assert_same_weights(_weights(out / "degradation_removal"), _weights(out / "checkpoint-32/degradation_removal_ema"))
    base, saved = _weights(Path(tiny_base) / "transformer"), _weights(out / "transformer")
    _assert_same_weights(base, {key[len("transformer."):]: value for key, value in saved.items()
                                if key.startswith("transformer.")})
    pipe = SanaRestorationPipeline.from_pretrained(str(out))
    assert isinstance(pipe.degradation_removal, DegradationRemovalModel)
    assert list(pipe.degradation_removal.config.block_out_channels) == [8, 16]
    assert pipe.degradation_removal.config.layers_per_block == 1
    assert pipe.config.sampling_defaults == SanaRestorationPipeline.from_pretrained_sana(tiny_base).config[
        "sampling_defaults"]  # the base's, kept

    # it learned: on the training pairs the stage's PSNR rises above the noisy input's (the identity's)
    assert _stage_psnr(pipe.degradation_removal, pair_data) > _stage_psnr(lambda x: x, pair_data) + 0.5

    # the pipeline restores through it
    image = Image.open(pair_data / "noisy2.png")
    restored = pipe(image, output_type="np", generator=torch.Generator().manual_seed(0), max_sequence_length=16).images
    assert restored.shape == (1, 64, 64, 3) and np.isfinite(restored).all()

    # validation logged the stage's PSNR, and the card says what was trained
    assert Image.open(out / "validation.png").size == (3 * 64, 64)  # before | stage | target
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "a new stage (the identity)" in card and "not trained for restoration yet" in card
    assert "TODO" not in card and "proofread" not in card  # no unfilled template sections
    stage_psnr = float(re.search(r"The stage alone: PSNR (\d+\.\d\d) dB", card).group(1))
    noisy1 = _psnr(np.asarray(Image.open(pair_data / "noisy1.png")), np.asarray(Image.open(pair_data / "clean/1.png")))
    assert stage_psnr > noisy1


def test_the_stage_resumes_exactly(stage_run, tiny_base, pair_data, tmp_path):
    """16 steps, then resume for 16 more == the 32 uninterrupted steps (stage and EMA), bit for bit; a stage checkpoint
    is refused by train_paired.py."""
    import test_train_paired

    full = stage_run["output_dir"]
    output_dir = tmp_path / "out"
    args = _args(tiny_base, pair_data, output_dir, *SMALL_STAGE, *TRAINING)
    _run(_with_max_steps(args, 16))
    _reset_accelerate()
    _run(args + ["--resume_from_checkpoint", "latest"])
    for sub in ("checkpoint-32/degradation_removal", "checkpoint-32/degradation_removal_ema", "degradation_removal"):
        _assert_same_weights(_weights(full / sub), _weights(output_dir / sub))

    _reset_accelerate()
    with pytest.raises(ValueError, match="trains the degradation_removal, not the transformer"):
        test_train_paired._run(test_train_paired._base_args(
            tiny_base, pair_data, tmp_path / "other", "--max_train_steps", 1,
            "--resume_from_checkpoint", output_dir / "checkpoint-16"))


def test_an_existing_stage_is_trained_further_and_not_contradicted(stage_run, pair_data, tmp_path):
    base = stage_run["output_dir"]
    with pytest.raises(ValueError, match=r"--block_out_channels \(8, 32\) contradicts .*\[8, 16\]"):
        _run(_args(base, pair_data, tmp_path / "bad", "--block_out_channels", "8,32"))
    _reset_accelerate()
    with pytest.raises(ValueError, match=r"--noise_level_input True contradicts"):
        _run(_args(base, pair_data, tmp_path / "bad2", "--noise_level_input"))
    _reset_accelerate()
    output_dir = tmp_path / "further"
    _run(_args(base, pair_data, output_dir, "--layers_per_block", 1, "--max_train_steps", 1, "--learning_rate", 1e-12,
               "--checkpointing_steps", 100))
    before, after = _weights(base / "degradation_removal"), _weights(output_dir / "degradation_removal")
    assert before.keys() == after.keys()
    for key in before:  # it started from the base's trained stage, not from a new (identity) one
        torch.testing.assert_close(after[key], before[key], atol=1e-9, rtol=0)
    assert before["conv_out.weight"].abs().max() > 0
    card = (output_dir / "README.md").read_text(encoding="utf-8")
    assert "the stage of the base pipeline" in card and "not trained for restoration yet" not in card


def test_a_pickled_base_loads_as_the_pipeline_loads_it(stage_run, pair_data, tmp_path):
    """A base pipeline whose stage is pickled loads through torch's weights-only loader; one whose pickle carries
    code is refused with the package's error, and the code never runs."""
    import shutil

    from test_train_paired import _Unpickled

    from diffusers_restore.models.safe_weights import UnsafeWeightsError

    base, marker = tmp_path / "base", tmp_path / "code-ran"
    shutil.copytree(stage_run["output_dir"], base, ignore=shutil.ignore_patterns("checkpoint-*"))
    stage = base / "degradation_removal" / "diffusion_pytorch_model"
    weights = _weights(base / "degradation_removal")
    (stage.parent / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({**weights, "extra": _Unpickled(marker)}, f"{stage}.bin")
    arguments = ("--max_train_steps", 1, "--learning_rate", 1e-12, "--checkpointing_steps", 100)
    with pytest.raises(UnsafeWeightsError, match="holds Python objects besides tensors"):
        _run(_args(base, pair_data, tmp_path / "refused", *arguments))
    assert not marker.exists()
    torch.save(weights, f"{stage}.bin")
    _reset_accelerate()
    _run(_args(base, pair_data, tmp_path / "out", *arguments))
    trained = _weights(tmp_path / "out" / "degradation_removal")
    assert trained.keys() == weights.keys()
    for key in weights:  # it started from the pickled stage
        torch.testing.assert_close(trained[key], weights[key], atol=1e-9, rtol=0)


def test_a_conditioned_stage_trains(tiny_base, pair_data, tmp_path):
    """--noise_level_input and --statistics_input give a new stage 1 + 2 constant input channels, which it uses."""
    output_dir = tmp_path / "conditioned"
    _run(_args(tiny_base, pair_data, output_dir, *SMALL_STAGE, "--noise_level_input", "--statistics_input",
               "--loss_type", "mse", "--max_train_steps", 4, "--checkpointing_steps", 100, "--train_batch_size", 3,
               "--learning_rate", 3e-3))
    stage = SanaRestorationPipeline.from_pretrained(str(output_dir)).degradation_removal
    assert stage.config.noise_level_input is True and stage.config.statistics_input is True
    assert stage.conv_in.in_channels == (3 + 1 + 2) * 4  # pixel-unshuffled
    assert stage.conv_out.weight.abs().max() > 0  # trained away from the identity
    image = torch.from_numpy(np.array(Image.open(pair_data / "noisy1.png"))).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        estimated = stage(image)  # the statistics estimated from the image
        told = stage(image, statistics=torch.tensor([[2.0, 0.3]]))
    assert (estimated - told).abs().max() > 1e-6
    card = (output_dir / "README.md").read_text(encoding="utf-8")
    assert "`statistics_input=True`" in card


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--block_out_channels", "8,x"], "--block_out_channels must be comma-separated positive widths"),
        (["--layers_per_block", "0"], "--layers_per_block must be >= 1"),
        (["--resolution", "48"], "--resolution must be a positive multiple of 32"),
        (["--train_data_dir", "."], "exactly one of --train_data_csv and --train_data_dir"),
        (["--resume_from_checkpoint", "/typo/checkpoint-2"], "no such checkpoint"),
    ],
)
def test_bad_arguments_are_refused_in_one_line(tiny_base, pair_data, tmp_path, capsys, extra, message):
    args = _args(tiny_base, pair_data, tmp_path / "out", *extra)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train_degradation_removal.parse_args(args)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1 and message in error, error
