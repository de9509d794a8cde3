# Copyright 2026 The diffusers-restore authors. Licensed under the Apache License, Version 2.0.
"""Tests of examples/train_paired.py on the tiny offline SANA kit (CPU, no network).

Most runs call `main(parse_args([...]))` in this process (much faster than a launcher); the script's `__main__` (the
output folder's lock, one-line errors) runs through `runpy`, and one test launches two "machines" with accelerate's
launcher.
"""

import os

# huggingface_hub reads these at import time; tests/conftest.py sets them too, but this folder has its own rootdir.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import csv  # noqa: E402
import importlib.machinery  # noqa: E402
import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import runpy  # noqa: E402
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

from diffusers_restore import ConcatConditionedTransformer, SanaRestorationPipeline  # noqa: E402
from diffusers_restore.models.safe_weights import UnsafeWeightsError  # noqa: E402
from diffusers_restore.training_utils import NonFiniteError, build_paired_dataset, resolve_checkpoint  # noqa: E402

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
    _write_csv(root / "pairs.csv", rows)
    return root


def _write_csv(path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image_path", "condition_image_path", "caption"])
        writer.writeheader()
        writer.writerows(rows)


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


def _with_data(args: list[str], flag: str, value) -> list[str]:
    """`args` with --train_data_csv replaced by another data source."""
    index = args.index("--train_data_csv")
    return args[:index] + [flag, str(value)] + args[index + 2:]


def _with_output_dir(args: list[str], output_dir) -> list[str]:
    index = args.index("--output_dir")
    return args[: index + 1] + [str(output_dir)] + args[index + 2 :]


def _run(args: list[str]) -> None:
    train_paired.main(train_paired.parse_args(args))


def _refusal(capsys, args: list[str]) -> str:
    """The one-line error with which parse_args refuses `args` (exit status 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train_paired.parse_args(args)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f"{Path(sys.argv[0]).name}: error: "), error
    return error


def _run_main(monkeypatch, capsys, args: list[str]) -> tuple[int, str]:
    """Run the script as `python train_paired.py ARGS` does (its `__main__`, in this process): exit status, stderr."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    return exit_info.value.code, capsys.readouterr().err


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def _transformer_inputs(caption_channels: int) -> dict:
    """Fixed inputs of a tiny restoration transformer (4 latent channels, 8x8, 16 tokens)."""
    generator = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 4, 8, 8, generator=generator),
                condition_latents=torch.randn(1, 4, 8, 8, generator=generator),
                encoder_hidden_states=torch.randn(1, 16, caption_channels, generator=generator),
                timestep=torch.tensor([500.0]), return_dict=False)


def _checkpoints(folder) -> set[str]:
    return {name for name in os.listdir(folder) if name.startswith("checkpoint-")}


def _files(folder, skip=("checkpoint-", "logs", "validation")) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes), except checkpoints, logs and the per-step grids."""
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in Path(folder).rglob("*")
        if path.is_file() and not path.relative_to(folder).parts[0].startswith(skip)
    }


def _record_steps(patch) -> list[dict]:
    """Record, per training step (forward passes with gradients), what the transformer got and returned and the loss
    given to backward, plus the clean / condition latents the VAE encoded and every decode."""
    from accelerate import Accelerator

    steps, encoded, decoded = [], [], []
    forward, backward = ConcatConditionedTransformer.forward, Accelerator.backward
    encode, decode = train_paired.encode_latents, train_paired.decode_latents

    def recording_forward(self, hidden_states, condition_latents=None, **kwargs):
        output = forward(self, hidden_states, condition_latents, **kwargs)
        if torch.is_grad_enabled():
            steps.append({"x_t": hidden_states.detach().clone(), "conditions": condition_latents.detach().clone(),
                          "timestep": kwargs["timestep"].detach().clone(),
                          "embeds": kwargs["encoder_hidden_states"].detach().clone(),
                          "prediction": output[0].detach().clone(), "encoded": list(encoded),
                          "decoded": decoded})
            encoded.clear()
        return output

    def recording_backward(self, loss, **kwargs):
        steps[-1]["loss"] = loss.detach().clone()
        return backward(self, loss, **kwargs)

    def recording_encode(vae, pixels):
        latents = encode(vae, pixels)
        encoded.append((pixels.detach().clone(), latents.detach().clone()))
        return latents

    def recording_decode(vae, latents):
        pixels = decode(vae, latents)
        decoded.append((latents.detach().clone(), pixels.detach().clone()))
        return pixels

    patch.setattr(ConcatConditionedTransformer, "forward", recording_forward)
    patch.setattr(Accelerator, "backward", recording_backward)
    patch.setattr(train_paired, "encode_latents", recording_encode)
    patch.setattr(train_paired, "decode_latents", recording_decode)
    return steps


def _shifted_sigmas(shift: float, steps: int = 1000) -> torch.Tensor:
    """SANA's training noise levels, written out: the `steps` levels 1, 1 - 1/steps, ... shifted by `shift`."""
    sigmas = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    return shift * sigmas / (1 + (shift - 1) * sigmas)


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


# ------------------------------------------------------------------------------------- arguments and data, up front


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--train_data_dir", "."], "exactly one of"),
        (["--max_train_steps", "0"], "--max_train_steps must be >= 1, got 0"),
        (["--resolution", "40"], "--resolution must be a positive multiple of 32"),
        (["--conditioning_dropout_prob", "0.1", "--proportion_empty_prompts", "0.1"], "not both"),
        (["--use_lora", "--use_ema"], "--use_ema"),
        (["--quantize", "int8"], "--quantize freezes the transformer's base weights under LoRA adapters: it needs"),
        (["--degradation", "gaussian_noize:25"], "--degradation"),
        (["--validation_target_image", "x.png"], "--validation_image"),
        (["--checkpoints_total_limit", "0"], "--checkpoints_total_limit"),
        (["--resume_from_checkpoint", "step-3"], "--resume_from_checkpoint step-3: expected"),
        (["--resume_from_checkpoint", "checkpoint-3"], "no such checkpoint"),
        (["--pixel_loss_weight", "1", "--cache_latents"], "--cache_latents"),
        (["--pixel_loss_weight", "1", "--offload"], "--offload"),
        (["--fidelity", "0.5"], "--fidelity and --pixel_loss change the pixel loss"),
        (["--pixel_loss", "psnr"], "--fidelity and --pixel_loss change the pixel loss"),
        (["--condition_residual"], "--condition_residual is for a full --training_objective one_step run"),
        (["--direction", "degrade", "--negative_sample_prob", "0.2"], "for restorers"),
        (["--validation_inference_steps", "0"], "--validation_inference_steps"),
        (["--streaming", "--max_train_steps", "2"], "--streaming applies to --dataset_name"),
    ],
)
def test_bad_arguments_are_refused_in_one_line(tiny_base, pair_data, tmp_path, capsys, extra, message):
    error = _refusal(capsys, _base_args(tiny_base, pair_data, tmp_path / "out", *extra))
    assert message in error
    assert not (tmp_path / "out").exists()


def test_validation_counts_and_files_are_checked(tiny_base, pair_data, tmp_path, capsys):
    image = str(pair_data / "noisy0.png")
    args = _base_args(tiny_base, pair_data, tmp_path, "--validation_image", image, image)
    assert "one --validation_target_image per" in _refusal(capsys, args + ["--validation_target_image", image])
    assert "one --validation_prompt for all" in _refusal(capsys, args + ["--validation_prompt", "a", "b", "c"])
    assert "missing.png is not a file" in _refusal(capsys, args + ["--validation_target_image", image, "missing.png"])
    assert train_paired.parse_args(args + ["--validation_prompt", "a"]).validation_prompt == ["a", "a"]


def test_every_csv_row_is_checked_before_training(tiny_base, pair_data, tmp_path, capsys):
    """A missing file, an unreadable one and a pair whose sizes do not match, on three rows: all named (file and line)
    in one line before any model loads; --skip_bad_samples trains on the good rows instead."""
    (tmp_path / "broken.png").write_bytes(b"not an image")
    Image.fromarray(np.zeros((64, 32, 3), np.uint8)).save(tmp_path / "narrow.png")
    good = [{"image_path": str(pair_data / "clean" / f"{i}.png"),
             "condition_image_path": str(pair_data / f"noisy{i}.png"), "caption": ""} for i in range(3)]
    bad = [{**good[0], "image_path": str(tmp_path / "missing.png")},
           {**good[0], "condition_image_path": str(tmp_path / "broken.png")},
           {**good[0], "condition_image_path": str(tmp_path / "narrow.png")}]
    _write_csv(tmp_path / "pairs.csv", [good[0], bad[0], good[1], bad[1], bad[2], good[2]])
    args = _with_data(_base_args(tiny_base, pair_data, tmp_path / "out", "--max_train_steps", 1), "--train_data_csv",
                      tmp_path / "pairs.csv")
    error = _refusal(capsys, args)
    assert "3 of the 6 rows" in error
    for line, what in ((3, "missing.png"), (5, "broken.png"), (6, "aspect ratios disagree")):
        assert f"pairs.csv, line {line}: " in error and what in error
    assert not (tmp_path / "out").exists()

    _write_csv(tmp_path / "header-only.csv", [])
    assert "holds no pairs" in _refusal(capsys, _with_data(args, "--train_data_csv", tmp_path / "header-only.csv"))

    parsed = train_paired.parse_args(args + ["--skip_bad_samples"])
    assert len(build_paired_dataset(parsed.train_data_csv, parsed, seed=0)) == 3
    _run(args + ["--skip_bad_samples"])
    assert (tmp_path / "out" / "model_index.json").is_file()


def test_multiline_captions_are_refused_unless_the_flag_allows_them(tiny_base, pair_data, tmp_path, capsys):
    multiline = tmp_path / "multiline.csv"
    multiline.write_text(
        "image_path,condition_image_path,caption\n"
        f'{pair_data / "clean" / "0.png"},{pair_data / "noisy0.png"},"a caption\nover two lines"\n'
        f'{pair_data / "clean" / "1.png"},{pair_data / "noisy1.png"},next\n',
        encoding="utf-8",
    )
    args = _with_data(_base_args(tiny_base, pair_data, tmp_path / "out"), "--train_data_csv", multiline)
    assert "multiline.csv, line 2: broken quoting" in _refusal(capsys, args)
    parsed = train_paired.parse_args([*args, "--allow_multiline_captions"])
    dataset = build_paired_dataset(parsed.train_data_csv, parsed, seed=0)
    assert [row.caption for row in dataset.rows] == ["a caption\nover two lines", "next"]


def test_resume_paths_resolve_as_in_diffusers_examples_and_never_silently(tiny_base, pair_data, tmp_path, capsys):
    """A bare `checkpoint-N` and 'latest' resolve inside output_dir; a path is taken as it is, so a mistyped folder is
    an error, not a resume from output_dir's checkpoint of the same name. An output_dir that is a file is refused."""
    output_dir = tmp_path / "out"
    (output_dir / "checkpoint-2").mkdir(parents=True)
    (output_dir / "checkpoint-2" / "training_state.json").write_text("{}")
    args = _base_args(tiny_base, pair_data, output_dir)
    error = _refusal(capsys, args + ["--resume_from_checkpoint", "/typo/checkpoint-2"])
    assert "--resume_from_checkpoint /typo/checkpoint-2: no such checkpoint" in error
    for name in ("checkpoint-2", str(output_dir / "checkpoint-2"), "latest"):
        assert resolve_checkpoint(str(output_dir), name) == str(output_dir / "checkpoint-2")
        train_paired.parse_args(args + ["--resume_from_checkpoint", name])
    (tmp_path / "a-file").write_text("")
    assert "is a file, not a folder" in _refusal(capsys, _with_output_dir(args, tmp_path / "a-file"))


def test_a_second_run_into_a_held_output_dir_is_refused(tiny_base, pair_data, tmp_path, monkeypatch, capsys):
    """While another run holds output_dir (its lock), a new one stops at its start with one line and exit status 2,
    touching nothing; the lock of a run that has ended (a stale lock file) does not block."""
    from filelock import FileLock

    from diffusers_restore.training_utils import LOCK_NAME, output_dir_lock

    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "checkpoint-1.tmp").mkdir()  # what the running one is writing
    with FileLock(output_dir / LOCK_NAME):
        status, error = _run_main(monkeypatch, capsys, _base_args(tiny_base, pair_data, output_dir))
    assert status == 2 and error.strip().splitlines()[-1] == (
        f"train_paired.py: error: --output_dir {output_dir} is in use by another training run."
    )
    assert (output_dir / "checkpoint-1.tmp").is_dir()
    with output_dir_lock(str(output_dir)):  # the lock file is still there, but nobody holds it
        pass


def test_a_data_error_met_in_training_ends_in_one_line(tiny_base, pair_data, tmp_path, monkeypatch, capsys):
    """An image whose header reads but whose pixels are cut off passes the up-front check; when training decodes it,
    the run ends like an argument error (one line naming the file and row, exit status 2), not with a traceback."""
    whole = (pair_data / "noisy0.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    rows = [{"image_path": str(pair_data / "clean" / "0.png"), "condition_image_path": str(tmp_path / "cut.png"),
             "caption": ""}] * 2
    _write_csv(tmp_path / "pairs.csv", rows)
    args = _with_data(_base_args(tiny_base, pair_data, tmp_path / "out", "--max_train_steps", 1),
                      "--train_data_csv", tmp_path / "pairs.csv")
    status, error = _run_main(monkeypatch, capsys, args)
    assert status == 2 and "Traceback" not in error
    last_line = error.strip().splitlines()[-1]  # after the progress bar
    assert f"train_paired.py: error: {tmp_path / 'pairs.csv'}, line 2: condition image " in last_line
    assert "cut.png' cannot be read" in last_line


# ------------------------------------------------------------------------------------------------------- the maths


def test_the_loss_is_flow_matching_on_the_schedulers_shifted_levels(tiny_base, pair_data, tmp_path):
    """One step, rebuilt here from the seed: u ~ logit-normal from the run's generator, sigma = SANA's shifted level
    (shift 3 from the base's DPM-Solver `flow_shift`) at u * 1000, x_t = (1 - sigma) z + sigma noise reaches the model
    with t = 1000 sigma, and the loss is the MSE to noise - z."""
    with pytest.MonkeyPatch.context() as patch:
        steps = _record_steps(patch)
        _run(_base_args(tiny_base, pair_data, tmp_path / "out", "--max_train_steps", 1, "--checkpointing_steps", 10))
    (step,) = steps
    clean_latents = step["encoded"][0][1].chunk(2)[0]
    generator = torch.Generator().manual_seed(0)
    u = torch.sigmoid(torch.normal(0.0, 1.0, size=(2,), generator=generator))
    sigmas = _shifted_sigmas(3.0)[(u * 1000).long()].float()
    noise = torch.randn(clean_latents.shape, generator=generator)
    s = sigmas.view(2, 1, 1, 1)
    torch.testing.assert_close(step["timestep"], sigmas * 1000)
    torch.testing.assert_close(step["x_t"], (1 - s) * clean_latents + s * noise)
    torch.testing.assert_close(step["loss"], ((step["prediction"] - (noise - clean_latents)) ** 2).mean())


def test_one_step_objective_with_the_fidelity_pixel_loss(tiny_base, pair_data, tmp_path):
    """--training_objective one_step: sigma = 1, x_t is the noise and x0 = x_t - v. --pixel_loss_weight w adds w times
    the MSE between decode(x0) and clean - f * r, r = c - decode(encode(c)) what the VAE loses of the condition image
    c: the output the pipeline gives with `fidelity=f` is decode(x0) + f * r. The model records f and one step."""
    w = 0.5
    with pytest.MonkeyPatch.context() as patch:
        steps = _record_steps(patch)
        _run(_base_args(tiny_base, pair_data, tmp_path / "out", "--training_objective", "one_step",
                        "--pixel_loss_weight", w, "--fidelity", 1.0, "--max_train_steps", 1,
                        "--checkpointing_steps", 10, "--center_crop"))
    (step,) = steps
    (pixels, latents), = step["encoded"]
    clean, conditions = pixels.float().chunk(2)
    clean_latents, condition_latents = latents.chunk(2)
    torch.testing.assert_close(step["timestep"], torch.full((2,), 1000.0))
    x0 = step["x_t"] - step["prediction"]
    (residual_input, condition_decoded), (x0_input, x0_decoded) = step["decoded"]
    torch.testing.assert_close(residual_input, condition_latents)
    torch.testing.assert_close(x0_input, x0)
    flow_matching = ((x0 - clean_latents) ** 2).mean()
    target = clean - (conditions - condition_decoded)
    torch.testing.assert_close(step["loss"], flow_matching + w * ((x0_decoded - target) ** 2).mean())
    assert ((x0_decoded - clean) ** 2).mean() != ((x0_decoded - target) ** 2).mean()
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["sampling_defaults"] == {"num_inference_steps": 1, "guidance_scale": 1.0, "fidelity": 1.0}


def test_condition_residual_start_and_the_psnr_pixel_loss(tiny_base, pair_data, tmp_path):
    """--condition_residual: the first step's one-step estimate x0 is the condition latent (SANA's output layer
    zeroed), and the saved transformer keeps the flag. --pixel_loss psnr: the pixel term is the batch mean of
    10 log10(MSE_b + (1/255)^2) with each sample's MSE in [0, 1] pixels. Resuming without the flag is refused."""
    w = 0.5
    args = ("--training_objective", "one_step", "--condition_residual", "--pixel_loss_weight", w, "--pixel_loss",
            "psnr", "--max_train_steps", 1, "--checkpointing_steps", 1, "--center_crop")
    with pytest.MonkeyPatch.context() as patch:
        steps = _record_steps(patch)
        _run(_base_args(tiny_base, pair_data, tmp_path / "out", *args))
    (step,) = steps
    (pixels, latents), = step["encoded"]
    clean = pixels.float().chunk(2)[0]
    clean_latents, condition_latents = latents.chunk(2)
    x0 = step["x_t"] - step["prediction"]
    torch.testing.assert_close(x0, condition_latents, rtol=0, atol=1e-5)
    (_, x0_decoded), = step["decoded"]
    flow_matching = ((x0 - clean_latents) ** 2).mean()
    psnr_loss = np.mean([10 * np.log10(np.mean(((decoded - target).double().numpy() / 2) ** 2) + 255.0 ** -2)
                         for decoded, target in zip(x0_decoded, clean)])
    torch.testing.assert_close(step["loss"].double(), flow_matching.double() + w * psnr_loss, rtol=1e-5, atol=1e-5)

    saved = ConcatConditionedTransformer.from_pretrained(tmp_path / "out", subfolder="transformer")
    assert saved.config.condition_residual is True
    assert not torch.equal(saved.transformer.proj_out.weight, torch.zeros_like(saved.transformer.proj_out.weight))
    _reset_accelerate()
    resume = [arg for arg in args if arg != "--condition_residual"]
    with pytest.raises(ValueError, match="trained with --condition_residual: resume it the same way"):
        _run(_base_args(tiny_base, pair_data, tmp_path / "out", *resume, "--max_train_steps", 2,
                        "--resume_from_checkpoint", "latest"))


def test_one_step_training_learns_and_records_how_to_sample(full_run, pair_data, tmp_path):
    """Stage 2 from a flow-matching restorer: its one-step restorations of the training pairs get closer to the clean
    images, and the saved pipeline and its card say to sample with one step and no guidance."""
    from diffusers_restore.data.latents import decode_latents, encode_latents
    from diffusers_restore.metrics import psnr, to_tensor01

    full = full_run["output_dir"]
    output_dir = tmp_path / "one-step"

    def one_step_psnr(folder) -> float:
        """PSNR of one-step restorations of the training pairs against the VAE round trip of the clean image (what
        a latent model can reach; the tiny test VAE is untrained, so the clean photo itself is out of reach)."""
        pipe = SanaRestorationPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        scores = []
        for index in range(6):
            noisy = Image.open(pair_data / f"noisy{index}.png").resize((32, 32), Image.BICUBIC)
            clean = to_tensor01(Image.open(pair_data / "clean" / f"{index}.png").resize((32, 32), Image.BICUBIC))
            with torch.no_grad():
                reachable = (decode_latents(pipe.vae, encode_latents(pipe.vae, clean * 2 - 1)) / 2 + 0.5).clamp(0, 1)
            restored = pipe(noisy, prompt="", num_inference_steps=1, guidance_scale=1.0, color_fix=None,
                            max_sequence_length=16, generator=torch.Generator().manual_seed(0))
            scores.append(float(psnr(to_tensor01(restored.images[0]), reachable)))
        return float(np.mean(scores))

    _run(_base_args(full, pair_data, output_dir, "--training_objective", "one_step", "--pixel_loss_weight", 1.0,
                    "--max_train_steps", 30, "--learning_rate", 3e-3, "--checkpointing_steps", 100, "--center_crop"))
    assert one_step_psnr(output_dir) > one_step_psnr(full) + 0.5  # measured: 13.2 -> 14.5 dB
    assert SanaRestorationPipeline.from_pretrained(output_dir).config.sampling_defaults == {
        "num_inference_steps": 1, "guidance_scale": 1.0
    }
    card = (output_dir / "README.md").read_text(encoding="utf-8")
    assert "`num_inference_steps=1, guidance_scale=1.0`" in card and "one-step restorer" in card
    assert "| pixel loss weight | 1.0 |" in card


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
    full = full_run["output_dir"]
    _assert_same_weights(_weights(full / "transformer"), _weights(full / "checkpoint-4" / "transformer_ema"))
    pipe = SanaRestorationPipeline.from_pretrained(str(full))
    assert pipe.scheduler.config.shift == 3.0  # SANA's flow_shift carried over from the DPM-Solver config
    # the model samples as validation did unless told otherwise
    recorded = {"num_inference_steps": 2, "guidance_scale": 2.0, "guidance_scale_start": 1.0}
    assert pipe.config.sampling_defaults == recorded
    image = Image.open(pair_data / "noisy2.png")
    restored = pipe(image, output_type="np", generator=torch.Generator().manual_seed(0), max_sequence_length=16).images
    assert restored.shape == (1, 64, 64, 3)
    assert np.isfinite(restored).all() and restored.min() >= 0.0 and restored.max() <= 1.0


def test_prompts_are_encoded_once(full_run, tiny_base):
    """The text encoder saw each distinct prompt once, although training asked for 8 prompts (4 steps x 2)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base, subfolder="tokenizer")
    texts = [tokenizer.decode(row, skip_special_tokens=True) for row in full_run["encoded_rows"]]
    for caption in CAPTIONS:  # SANA lower-cases prompts; max_sequence_length 16 keeps their start
        assert sum(bool(text) and caption.lower().startswith(text) for text in texts) == 1, (caption, texts)
    assert texts.count("") <= 1, texts


def test_validation_grid_metrics_and_model_card(full_run):
    from huggingface_hub import ModelCard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    full = full_run["output_dir"]
    grid = Image.open(full / "validation.png")
    assert grid.size == (3 * 64, 64)  # before | after | target
    assert (full / "validation" / "step-2.png").is_file() and (full / "validation" / "step-4.png").is_file()

    card_text = (full / "README.md").read_text(encoding="utf-8")
    card = ModelCard(card_text)
    assert card.data.pipeline_tag == "image-to-image" and card.data.library_name == "diffusers"
    assert {"image-restoration", "diffusers-training"} <= set(card.data.tags)
    assert card_text.count("# out\n") == 1  # the folder's name, not its path
    assert "from_pretrained(\"out\"" in card_text and str(full) not in card_text
    assert "TODO" not in card_text and "proofread" not in card_text  # no unfilled template sections
    assert "PSNR" in card_text and "![validation](validation.png)" in card_text
    assert "| training steps | 4 |" in card_text and "| EMA | decay 0.9 |" in card_text
    assert "trained with flow matching" in card_text and "shift 3" in card_text
    assert "`num_inference_steps=2, guidance_scale=2.0, guidance_scale_start=1.0`" in card_text
    assert "{" not in card_text.split("```python")[1].split("```")[0]  # every placeholder filled

    tags = {"images": set(), "scalars": set()}
    for event_file in (full / "logs").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        for kind in tags:
            tags[kind] |= set(accumulator.Tags()[kind])
    assert {"validation", "test"} <= tags["images"]
    assert {"loss", "lr", "validation/psnr", "validation/ssim", "test/psnr"} <= tags["scalars"]


def test_lora_run_saves_what_load_lora_weights_loads_and_resumes_exactly(tiny_base, pair_data, tmp_path):
    lora = ["--use_lora", "--rank", 2, "--lora_alpha", 2, "--learning_rate", 1e-2, "--max_train_steps", 4,
            "--checkpointing_steps", 1, "--checkpoints_total_limit", 2]
    first = tmp_path / "first"
    _run(_base_args(tiny_base, pair_data, first, *lora))
    assert _checkpoints(first) == {"checkpoint-3", "checkpoint-4"}
    adapter = load_file(first / "transformer_lora" / "pytorch_lora_weights.safetensors")
    assert adapter and all("lora" in key for key in adapter)

    # the saved pipeline has the adapter merged in; the base with the adapter loaded computes the same
    fused = _weights(first / "transformer")
    assert not any("lora" in key for key in fused)
    saved = SanaRestorationPipeline.from_pretrained(str(first)).transformer
    base = SanaRestorationPipeline.from_pretrained_sana(tiny_base)
    base.load_lora_weights(first / "transformer_lora")
    inputs = _transformer_inputs(saved.config.caption_channels)
    with torch.no_grad():
        expected = saved(**inputs)[0]
        torch.testing.assert_close(base.transformer(**inputs)[0], expected, rtol=1e-4, atol=1e-5)
        assert (SanaRestorationPipeline.from_pretrained_sana(tiny_base).transformer(**inputs)[0]
                - expected).abs().max() > 1e-3

    _reset_accelerate()
    second = tmp_path / "second"
    second.mkdir()
    shutil.copytree(first / "checkpoint-3", second / "checkpoint-3")
    _run(_base_args(tiny_base, pair_data, second, *lora, "--resume_from_checkpoint", "latest"))
    _assert_same_weights(fused, _weights(second / "transformer"))

    _reset_accelerate()
    with pytest.raises(ValueError, match="holds other LoRA layers: resume with its --rank and --lora_layers"):
        _run(_base_args(tiny_base, pair_data, second, *lora, "--lora_layers", "to_q,to_k,to_v,to_out.0",
                        "--resume_from_checkpoint", "checkpoint-3"))


@pytest.mark.parametrize("mode, quantized_type", [("int8", "Int8Tensor"), ("nf4", "Params4bit")])
def test_qlora_saves_a_lora_that_loads_onto_the_unquantized_base(tiny_base, pair_data, tmp_path, monkeypatch, mode,
                                                                 quantized_type):
    """--quantize (int8: torchao, which runs on a CPU; nf4: bitsandbytes through diffusers, GPU only): the frozen base
    trains quantized, the adapters and the condition projection float32, with gradient checkpointing; the LoRA loads
    with `load_lora_weights` onto the unquantized base (scale alpha / rank kept), which restores finite images and
    equals the saved merged pipeline; a run resumed from a checkpoint ends with the same LoRA."""
    pytest.importorskip({"int8": "torchao", "nf4": "bitsandbytes"}[mode])
    if mode == "nf4" and not torch.cuda.is_available():
        pytest.skip("diffusers' bitsandbytes quantizer refuses a machine without a GPU ('No GPU found')")
    loaded = []
    from_pretrained = ConcatConditionedTransformer.from_pretrained.__func__

    def recording_from_pretrained(cls, *args, **kwargs):
        loaded.append(from_pretrained(cls, *args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(ConcatConditionedTransformer, "from_pretrained", classmethod(recording_from_pretrained))
    qlora = ["--use_lora", "--quantize", mode, "--rank", 2, "--lora_alpha", 4, "--learning_rate", 1e-2,
             "--max_train_steps", 2, "--checkpointing_steps", 1, "--gradient_checkpointing", "--mixed_precision", "bf16"]
    first = tmp_path / "first"
    _run(_base_args(tiny_base, pair_data, first, *qlora))
    trained, merged_base = loaded
    to_q = trained.transformer.transformer_blocks[0].attn1.to_q
    assert type(to_q.base_layer.weight).__name__ == quantized_type
    assert type(trained.projection.weight) is torch.nn.Parameter and trained.projection.weight.dtype == torch.float32
    trained_projection = trained.projection.weight.detach().cpu()
    assert not torch.equal(trained_projection[:, :4, 0, 0], torch.eye(4))  # trained
    assert type(merged_base.transformer.transformer_blocks[0].attn1.to_q.weight) is torch.nn.Parameter

    pipe = SanaRestorationPipeline.from_pretrained_sana(tiny_base)
    pipe.set_progress_bar_config(disable=True)
    image = np.asarray(Image.open(pair_data / "noisy0.png"))
    plain = pipe(image, "Denoise this photograph", num_inference_steps=2, output_type="np").images[0]
    pipe.load_lora_weights(first / "transformer_lora")
    loaded_q = pipe.transformer.transformer.transformer_blocks[0].attn1.to_q
    assert torch.equal(loaded_q.lora_A["default_0"].weight, to_q.lora_A["default"].weight.detach().cpu())
    assert loaded_q.scaling["default_0"] == 2.0
    probe = torch.randn(1, 8, 2, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(pipe.transformer.projection(probe),
                                   torch.nn.functional.conv2d(probe, trained_projection))
    restored = pipe(image, "Denoise this photograph", num_inference_steps=2, output_type="np").images[0]
    assert np.isfinite(restored).all() and np.abs(restored - plain).max() > 1e-3

    saved = SanaRestorationPipeline.from_pretrained(str(first)).transformer
    assert type(saved.transformer.transformer_blocks[0].attn1.to_q.weight) is torch.nn.Parameter
    inputs = _transformer_inputs(saved.config.caption_channels)
    with torch.no_grad():
        torch.testing.assert_close(pipe.transformer(**inputs)[0], saved(**inputs)[0], rtol=1e-4, atol=1e-5)

    _reset_accelerate()
    second = tmp_path / "second"
    second.mkdir()
    shutil.copytree(first / "checkpoint-1", second / "checkpoint-1")
    _run(_base_args(tiny_base, pair_data, second, *qlora, "--resume_from_checkpoint", "checkpoint-1"))
    lora_file = Path("transformer_lora", "pytorch_lora_weights.safetensors")
    _assert_same_weights(load_file(first / lora_file), load_file(second / lora_file))


def test_quantize_is_refused_where_its_backend_cannot_run(tiny_base, pair_data, tmp_path, capsys, monkeypatch):
    args = _base_args(tiny_base, pair_data, tmp_path / "out", "--use_lora")
    if not torch.cuda.is_available():
        error = _refusal(capsys, args + ["--quantize", "nf4"])
        assert error.endswith("error: --quantize nf4 needs a GPU: diffusers' bitsandbytes quantizer does not run on "
                              "the CPU (int8 does).\n")
    version = importlib.metadata.version

    def without_torchao(name):
        if name == "torchao":
            raise importlib.metadata.PackageNotFoundError(name)
        return version(name)

    monkeypatch.setattr(importlib.metadata, "version", without_torchao)
    error = _refusal(capsys, args + ["--quantize", "int8"])
    assert error.endswith("error: --quantize int8 needs torchao >= 0.16.0 (it is not installed): pip install -U "
                          "torchao.\n")
    assert not (tmp_path / "out").exists()


def test_resume_is_exact_with_accumulation_and_on_the_fly_data(tiny_base, pair_data, tmp_path):
    """Folder of clean images degraded on the fly, gradient accumulation (the resume position counts batches),
    ip2p conditioning dropout, gradient checkpointing, --offload, the 'mode' density and SANA's long instruction."""
    options = [
        "--gradient_accumulation_steps", 2, "--max_train_steps", 2, "--checkpointing_steps", 1,
        "--conditioning_dropout_prob", 0.2, "--gradient_checkpointing", "--offload", "--weighting_scheme", "mode",
        "--complex_human_instruction", "default", "--degradation", "random", "--random_flip",
    ]

    def args(output_dir, *extra):
        return _with_data(_base_args(tiny_base, pair_data, output_dir, *options, *extra), "--train_data_dir",
                          pair_data / "clean")

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
    assert resolve_checkpoint(str(output_dir), "latest") == str(output_dir / "checkpoint-1")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_checkpoint(str(output_dir), str(output_dir / "checkpoint-2.tmp"))

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


def _poison_steps(monkeypatch, steps: set[int], poison) -> None:
    """Make the transformer's output of the given (1-based) training steps `poison(output)`."""
    forward = ConcatConditionedTransformer.forward
    calls = []

    def poisoned(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        if not torch.is_grad_enabled():
            return output
        calls.append(None)
        return (poison(output[0]),) if len(calls) in steps else output

    monkeypatch.setattr(ConcatConditionedTransformer, "forward", poisoned)


def _all_finite(folder) -> bool:
    return all(torch.isfinite(tensor).all() for tensor in _weights(folder).values())


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(tiny_base, pair_data, tmp_path):
    """--learning_rate 1e4: the loss is NaN from step 2. The run stops there with an error naming the step, writes no
    non-finite checkpoint and no pipeline, and pruning (limit 2) keeps the good checkpoint."""
    output_dir = tmp_path / "out"
    with pytest.raises(NonFiniteError, match=r"diverged at step 2: .*checkpoint-1"):
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
    _poison_steps(monkeypatch, {2}, _NanGradient.apply)
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
    _poison_steps(monkeypatch, {2, 3}, lambda output: output * float("nan"))
    with pytest.raises(NonFiniteError, match=r"step 3: .*1 were skipped already"):
        _run(_base_args(tiny_base, pair_data, tmp_path / "stop", *options))
    assert _checkpoints(tmp_path / "stop") == {"checkpoint-1", "checkpoint-2"}


@pytest.mark.parametrize("poisoned", ["weights", "EMA"])
def test_one_nonfinite_weight_element_is_never_written(tiny_base, pair_data, tmp_path, monkeypatch, poisoned):
    """Weights are checked before every checkpoint and before the final pipeline, the EMA's included: a single NaN
    element in one tensor (the rest finite) is enough to refuse writing."""
    from diffusers.training_utils import EMAModel

    step = EMAModel.step

    def poisoning_step(self, parameters):
        parameters = list(parameters)
        step(self, parameters)
        if self.optimization_step == 2:  # after the second update: one element of one tensor
            tensor = parameters[3] if poisoned == "weights" else self.shadow_params[3]
            tensor.data.view(-1)[5] = float("nan")

    monkeypatch.setattr(EMAModel, "step", poisoning_step)
    name = "EMA transformer" if poisoned == "EMA" else "transformer"
    output_dir = tmp_path / "checkpoints"
    with pytest.raises(NonFiniteError, match=rf"Not writing checkpoint-2: 1 weight tensor\(s\).*\(e\.g\. {name}"):
        _run(_base_args(tiny_base, pair_data, output_dir, "--max_train_steps", 3, "--checkpointing_steps", 1,
                        "--use_ema", "--checkpoints_total_limit", 1))
    assert _checkpoints(output_dir) == {"checkpoint-1"}

    _reset_accelerate()
    output_dir = tmp_path / "pipeline"
    with pytest.raises(NonFiniteError, match=r"Not writing the final pipeline \(step 2\): 1 weight tensor"):
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
        resolve_checkpoint(str(output_dir), "checkpoint-1")
    assert resolve_checkpoint(str(output_dir), "latest") == str(output_dir / "checkpoint-3")

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


def test_weights_load_as_the_pipeline_loads_them_and_no_pickle_runs_code(full_run, tiny_base, pair_data, tmp_path):
    """Base weights load as the pipeline loads them: a pickled component through torch's weights-only loader, and one
    that carries code is refused with the package's error; accelerate's optimizer state loads with weights_only=True,
    so a pickle that would run code is refused there too."""
    marker = tmp_path / "code-ran"
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    vae = base / "vae" / "diffusion_pytorch_model"
    weights = load_file(f"{vae}.safetensors")
    os.remove(f"{vae}.safetensors")
    torch.save({**weights, "extra": _Unpickled(marker)}, f"{vae}.bin")
    with pytest.raises(UnsafeWeightsError, match="holds Python objects besides tensors"):
        _run(_base_args(base, pair_data, tmp_path / "out", "--max_train_steps", 1))
    torch.save(weights, f"{vae}.bin")
    _reset_accelerate()
    _run(_base_args(base, pair_data, tmp_path / "out", "--max_train_steps", 1))
    assert (tmp_path / "out" / "model_index.json").is_file()

    hidden_code = tmp_path / "hidden-code"
    shutil.copytree(full_run["output_dir"] / "checkpoint-2", hidden_code / "checkpoint-2")
    torch.save({"state": {}, "param_groups": [], "extra": _Unpickled(marker)},
               hidden_code / "checkpoint-2" / "optimizer.bin")
    _reset_accelerate()
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        _run(_with_output_dir(full_run["args"], hidden_code) + ["--resume_from_checkpoint", "latest"])
    assert not marker.exists()


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
    assert "# restorer\n" in (output_dir / "README.md").read_text()


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


def _fake_datasets(load_dataset) -> types.ModuleType:
    module = types.ModuleType("datasets")
    module.__spec__ = importlib.machinery.ModuleSpec("datasets", None)
    module.load_dataset = load_dataset
    return module


def test_dataset_name_reads_a_datasets_dataset(tiny_base, pair_data, tmp_path, monkeypatch, capsys):
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

    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(load_dataset))
    args = _with_data(_base_args(tiny_base, pair_data, tmp_path / "out", "--max_train_steps", 1), "--dataset_name",
                      "org/pairs") + ["--image_column", "hq", "--conditioning_image_column", "lq"]
    _run(args + ["--caption_column", "text"])
    assert requested == {"name": "org/pairs", "config": None}
    assert (tmp_path / "out" / "model_index.json").is_file()
    assert len((tmp_path / "out" / "dataset_export" / "pairs.csv").read_text().splitlines()) == 5

    _reset_accelerate()
    with pytest.raises(ValueError, match="--caption_column 'caption' is not a column"):
        _run(_with_output_dir(args, tmp_path / "out3") + ["--caption_column", "caption"])

    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    assert "pip install datasets" in _refusal(capsys, args)


def digest(state_dict: dict) -> str:
    """A SHA-256 of a model's weights (names, float32 values), here and in the processes the launch tests start."""
    import hashlib

    import torch

    sha = hashlib.sha256()
    for name, tensor in sorted(state_dict.items()):
        sha.update(name.encode() + tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return sha.hexdigest()


# Runs train_paired.py and writes each process's trained weights' digest to DIGESTS/rank-<i>.sha256 as the run ends.
RANK_DIGEST_SCRIPT = inspect.getsource(digest) + """
import importlib.util, os, sys
from accelerate import Accelerator
spec = importlib.util.spec_from_file_location("train_paired", {script!r})
train_paired = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_paired)
end_training = Accelerator.end_training

def recording_end_training(self):
    weights = self.unwrap_model(self._models[0]).state_dict()
    with open(os.path.join({digests!r}, f"rank-{{self.process_index}}.sha256"), "w") as handle:
        handle.write(digest(weights))
    end_training(self)

Accelerator.end_training = recording_end_training
train_paired.main(train_paired.parse_args(sys.argv[1:]))
"""


def _rank_digest_script(folder) -> tuple[Path, Path]:
    digests = folder / "digests"
    digests.mkdir(parents=True)
    script = folder / "train_paired_with_digests.py"
    script.write_text(RANK_DIGEST_SCRIPT.format(script=str(SCRIPT), digests=str(digests)))
    return script, digests


def _assert_ranks_saved_the_same_weights(digests: Path, output_dir: Path) -> None:
    rank0 = (digests / "rank-0.sha256").read_text()
    assert (digests / "rank-1.sha256").read_text() == rank0
    saved = ConcatConditionedTransformer.from_pretrained(str(output_dir), subfolder="transformer")
    assert digest(saved.state_dict()) == rank0


def test_repeats_give_distinct_samples_of_each_image(tiny_base, pair_data, tmp_path, capsys):
    args = train_paired.parse_args(_with_data(
        _base_args(tiny_base, pair_data, tmp_path, "--degradation", "gaussian_noise|jpeg", "--repeats", "3"),
        "--train_data_dir", pair_data / "clean"))
    dataset = build_paired_dataset(args.train_data_dir, args, seed=0)
    assert len(dataset) == 3 * 6
    first, repeat = dataset[0], dataset[6]  # the same photo, repeated
    assert dataset.rows[0] == dataset.rows[6]
    assert not torch.equal(first["conditioning_pixel_values"], repeat["conditioning_pixel_values"])
    assert "--repeats must be >= 1" in _refusal(capsys, _base_args(tiny_base, pair_data, tmp_path, "--repeats", "0"))


# --------------------------------------------------------------- a base pipeline with a degradation removal stage


def _shifted_stage():
    """A degradation removal stage that adds 0.25 to every pixel (clamped): an output clearly different from its
    input, known in closed form (`_shifted`)."""
    from diffusers_restore.models.degradation_removal import DegradationRemovalModel

    stage = DegradationRemovalModel(block_out_channels=(4,), layers_per_block=1)
    with torch.no_grad():
        stage.conv_out.bias.fill_(0.25)  # residual 0.25 everywhere (the weights are zero)
    return stage


@pytest.fixture(scope="module")
def shifted_stage_base(tiny_base, tmp_path_factory):
    """A (untrained) restoration pipeline made from the kit, with the shifted stage."""
    pipe = SanaRestorationPipeline.from_pretrained_sana(tiny_base)
    pipe.register_modules(degradation_removal=_shifted_stage())
    path = tmp_path_factory.mktemp("shifted-stage") / "base"
    pipe.save_pretrained(str(path))
    return path


def _shifted(pixels: torch.Tensor) -> torch.Tensor:
    """What the shifted stage makes of [-1, 1] pixels, in [-1, 1], written out by hand."""
    return ((pixels + 1) / 2 + 0.25).clamp(0, 1) * 2 - 1


def test_the_transformer_is_conditioned_through_the_base_stage(shifted_stage_base, pair_data, tmp_path):
    from diffusers import AutoencoderDC

    from diffusers_restore.data.latents import encode_latents

    output_dir = tmp_path / "out"
    args = _base_args(shifted_stage_base, pair_data, output_dir, "--max_train_steps", 1,
                      "--validation_image", pair_data / "noisy1.png",
                      "--validation_target_image", pair_data / "clean" / "1.png", "--validation_inference_steps", 1)
    with pytest.MonkeyPatch.context() as patch:
        steps = _record_steps(patch)
        _run(args)

    # the first batch, rebuilt here: the sampler's first two examples of epoch 0
    parsed = train_paired.parse_args(args)
    dataset = build_paired_dataset(parsed.train_data_csv, parsed, seed=0)
    dataset.set_epoch(0)
    order = list(train_paired.EpochShuffleSampler(len(dataset), seed=0))[:2]
    degraded = torch.stack([dataset[index]["conditioning_pixel_values"] for index in order])
    vae = AutoencoderDC.from_pretrained(shifted_stage_base, subfolder="vae")
    with torch.no_grad():
        expected, unstaged = encode_latents(vae, _shifted(degraded)), encode_latents(vae, degraded)
    torch.testing.assert_close(steps[0]["conditions"], expected, atol=1e-5, rtol=1e-5)
    assert (steps[0]["conditions"] - unstaged).abs().max() > 0.1  # the stage made a clear difference

    # the saved pipeline keeps the stage
    _assert_same_weights(_weights(shifted_stage_base / "degradation_removal"),
                         _weights(output_dir / "degradation_removal"))
    card = (output_dir / "README.md").read_text(encoding="utf-8")
    assert "| condition images | cleaned by the base's degradation removal stage |" in card


def test_the_latent_cache_records_the_stage(tiny_base, pair_data, tmp_path):
    """A cache built without the stage is not reused by a run with it (and the other way round), although the base
    folder, and so the text settings recorded with the cache, are the same."""
    from diffusers import AutoencoderDC

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
    with pytest.raises(LatentCacheError, match="extra.degradation_removal: cache has"):
        cached_run(without_stage)
    cached_run(with_stage)
    pipe.register_modules(degradation_removal=None)
    pipe.save_pretrained(str(base))  # and without it again
    with pytest.raises(LatentCacheError, match="extra.degradation_removal: cache has"):
        cached_run(with_stage)

    # the cached condition latents are those of the stage's output
    cache = CachedLatentDataset(with_stage, load_prompt_embeds=False)
    parsed = train_paired.parse_args(_base_args(base, pair_data, tmp_path))
    dataset = build_paired_dataset(parsed.train_data_csv, parsed, seed=0)
    dataset.set_epoch(0)
    vae = AutoencoderDC.from_pretrained(base, subfolder="vae")
    for item in (cache[0], cache[5]):
        degraded = dataset[item["index"]]["conditioning_pixel_values"][None]
        with torch.no_grad():
            expected = encode_latents(vae, _shifted(degraded))[0]
        torch.testing.assert_close(item["conditioning_latents"], expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- negative-quality samples


@pytest.mark.parametrize("cache", [False, True])
def test_negative_samples_train_the_degraded_image_under_the_negative_prompt(tiny_base, pair_data, tmp_path, cache):
    pipe = SanaRestorationPipeline.from_pretrained_sana(tiny_base)
    negative_embeds, _, _, _ = pipe.encode_prompt(
        train_paired.DEFAULT_NEGATIVE_PROMPT, do_classifier_free_guidance=False, max_sequence_length=16
    )
    extra = ["--max_train_steps", 2, "--negative_sample_prob", 1.0, "--training_objective", "one_step"]
    with pytest.MonkeyPatch.context() as patch:
        steps = _record_steps(patch)
        _run(_base_args(tiny_base, pair_data, tmp_path / "out", *extra, *(["--cache_latents"] if cache else [])))
    assert len(steps) == 2
    for step in steps:
        # one_step: x_t is the noise and the target x0 = noise - v; the loss's clean latent is the degraded one
        x0 = step["x_t"] - step["prediction"]
        torch.testing.assert_close(step["loss"], ((x0 - step["conditions"]) ** 2).mean(), rtol=1e-4, atol=1e-6)
        for row in step["embeds"]:
            torch.testing.assert_close(row, negative_embeds[0], rtol=0, atol=1e-5)
    assert "| negative-quality samples | 1.0 |" in (tmp_path / "out" / "README.md").read_text()


def test_negative_samples_with_a_stage_target_the_raw_degraded_image(shifted_stage_base, pair_data, tmp_path):
    """With a degradation removal stage the condition is the cleaned image; a negative sample's target stays the
    degraded image as given (its own latent), and a latent cache (which holds cleaned latents) is refused."""
    with pytest.MonkeyPatch.context() as patch:
        steps = _record_steps(patch)
        _run(_base_args(shifted_stage_base, pair_data, tmp_path / "out", "--max_train_steps", 1,
                        "--negative_sample_prob", 1.0, "--training_objective", "one_step",
                        "--checkpointing_steps", 100))
    (both, _), (raw, raw_latents) = steps[0]["encoded"]  # [clean, cleaned condition], then the raw degraded images
    torch.testing.assert_close(both.chunk(2)[1], _shifted(raw), rtol=0, atol=1e-5)
    x0 = steps[0]["x_t"] - steps[0]["prediction"]
    torch.testing.assert_close(steps[0]["loss"], ((x0 - raw_latents) ** 2).mean(), rtol=1e-4, atol=1e-6)
    _reset_accelerate()
    with pytest.raises(ValueError, match="cache holds the cleaned ones"):
        _run(_base_args(shifted_stage_base, pair_data, tmp_path / "out2", "--max_train_steps", 1,
                        "--negative_sample_prob", 0.5, "--cache_latents", "--checkpointing_steps", 100))


# ---------------------------------------------------------------------------------------- precision, optimiser, nodes


def test_bf16_autocast_trains_on_cpu(tiny_base, pair_data, tmp_path, monkeypatch):
    """`--mixed_precision bf16` runs on a CPU: the transformer's forward runs under bf16 autocast, the weights stay
    float32, the saved pipeline is float32 and finite, and a checkpoint resumes."""
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
    assert any(not torch.equal(weights[f"transformer.{key}"], initial[key]) for key in initial)
    assert "| mixed precision | bf16 |" in (output_dir / "README.md").read_text()

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


def test_two_nodes_train_the_same_weights_and_build_the_latent_cache_together(tiny_base, pair_data, tmp_path):
    """Two "machines" on this one: `accelerate launch --num_machines 2 --machine_rank R --main_process_ip 127.0.0.1`,
    one process each, as a real two-node launch runs it (rank 0's machine hosts the rendezvous): data parallel over
    gloo (accelerate's MULTI_CPU mode; `--multi_gpu` with ACCELERATE_USE_CPU=1 needs no MPI), with --cache_latents.
    Each process encodes its share of the cache's shards (3 shards of 2 pairs) and the main one merges them; both
    processes end with the saved weights, and only machine 0 writes the pipeline."""
    from diffusers_restore.data.latents import CachedLatentDataset

    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def launch_both(attempt: int):
        # The free port is found, released, then bound by the launcher: under a busy test run another process can take
        # it in between and the rendezvous then waits forever. A hung attempt is retried once on a fresh port and
        # fresh folders (a real failure fails both attempts).
        output_dir = tmp_path / f"out-{attempt}"
        script, digests = _rank_digest_script(tmp_path / f"attempt-{attempt}")
        port = _free_port()
        launches = []
        for machine_rank in (0, 1):
            command = [
                sys.executable, "-m", "accelerate.commands.launch",
                "--multi_gpu", "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(machine_rank),
                "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "--rdzv_backend", "static",
                "--same_network", "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
                *_base_args(tiny_base, pair_data, output_dir, "--max_train_steps", 2, "--train_batch_size", 1,
                            "--checkpointing_steps", 2, "--cache_latents", "--latent_cache_shard_size", 2),
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
        return launches, outputs, output_dir, digests

    launches, outputs, output_dir, digests = launch_both(0) or launch_both(1)
    for launch, output in zip(launches, outputs):
        assert launch.returncode == 0, output[-4000:]
    assert "DistributedType.MULTI_CPU" in outputs[0]
    _assert_ranks_saved_the_same_weights(digests, output_dir)
    initial = ConcatConditionedTransformer.from_pretrained(str(tiny_base), subfolder="transformer")
    assert digest(initial.state_dict()) != (digests / "rank-0.sha256").read_text()
    assert json.loads((output_dir / "checkpoint-2" / "training_state.json").read_text())["num_processes"] == 2
    assert (output_dir / "checkpoint-2" / "training_generator_1.safetensors").is_file()
    cache = output_dir / "latent_cache"
    index = json.loads((cache / "index.json").read_text())
    assert [entry["num_samples"] for entry in index["shards"]] == [2, 2, 2]
    assert not [name for name in os.listdir(cache) if name.startswith("progress")]
    cached = CachedLatentDataset(str(cache))
    assert sorted(int(cached[i]["index"]) for i in range(len(cached))) == list(range(6))


# ------------------------------------------------------------------------------------------- streaming data


def test_tar_shards_stream_and_resume_exactly(tiny_base, pair_data, tmp_path, capsys):
    """--train_data_shards: training streams the shards make-pairs writes; a run resumed from step 1 ends with the
    uninterrupted run's weights (each reader skips the pairs it had given). A stream needs --max_train_steps."""
    from diffusers_restore.data.paired_dataset import read_paired_csv
    from diffusers_restore.data.streaming import write_pair_shards

    rows, _ = read_paired_csv(str(pair_data / "pairs.csv"))
    write_pair_shards(rows, tmp_path / "shards", 2)
    pattern = str(tmp_path / "shards" / "pairs-{000000..000001}.tar")
    output_dir = tmp_path / "out"
    args = _with_data(_base_args(tiny_base, pair_data, output_dir, "--checkpointing_steps", 1,
                                 "--shuffle_buffer_size", 4), "--train_data_shards", pattern)
    assert "give the run's length with --max_train_steps" in _refusal(capsys, args)
    assert "--cache_latents needs a dataset with a length" in _refusal(
        capsys, args + ["--max_train_steps", "2", "--cache_latents"])
    _run(args + ["--max_train_steps", "3"])
    uninterrupted = _weights(output_dir / "transformer")
    assert "pairs streamed from" in (output_dir / "README.md").read_text()

    _reset_accelerate()
    for step in (2, 3):
        shutil.rmtree(output_dir / f"checkpoint-{step}")
    _run(args + ["--max_train_steps", "3", "--resume_from_checkpoint", "latest"])
    _assert_same_weights(_weights(output_dir / "transformer"), uninterrupted)


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
    args = _with_data(_base_args(tiny_base, pair_data, output_dir, "--max_train_steps", 2, "--caption_column", "text",
                                 "--streaming", "--degradation", "gaussian_noise:25"), "--dataset_name", folder)
    _run(args)
    assert (output_dir / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert not (output_dir / "dataset_export").exists()
    assert "streamed" in (output_dir / "README.md").read_text()


# ------------------------------------------------------------------------------------------- degrade direction


def test_degrade_direction_item_swaps_the_images_and_prompts_the_measured_severity(pair_data):
    from diffusers_restore import degrade_prompt
    from diffusers_restore.data.degradations import severity
    from diffusers_restore.data.paired_dataset import PairedDataset

    dataset = PairedDataset(str(pair_data / "clean"), resolution=32, degradation="gaussian_noise:25")
    item = dataset[0]
    swapped = train_paired.degrade_direction_item(item)
    assert torch.equal(swapped["pixel_values"], item["conditioning_pixel_values"])
    assert torch.equal(swapped["conditioning_pixel_values"], item["pixel_values"])

    def as_uint8(pixels):
        return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()

    measured = severity(as_uint8(item["pixel_values"]), as_uint8(item["conditioning_pixel_values"]))
    assert measured["mu_bin"] > 0
    assert swapped["prompt"] == degrade_prompt("gaussian_noise", measured["mu_bin"], measured["sigma_bin"])


def test_degrade_direction_trains_a_degradation_pipeline(tiny_base, pair_data, tmp_path, monkeypatch, capsys):
    """--direction degrade: trained on (clean -> degraded) with degrade prompts, saved as a SanaDegradationPipeline
    whose folder a restoration pipeline refuses; restorer-only flags and a restorer base are refused."""
    from diffusers_restore import SanaDegradationPipeline
    from diffusers_restore.data.latents import LatentCacheError

    prompts = []
    encode = SanaDegradationPipeline.encode_prompt
    monkeypatch.setattr(SanaDegradationPipeline, "encode_prompt",
                        lambda self, prompt, *args, **kwargs: prompts.extend(prompt) or encode(self, prompt, *args,
                                                                                                **kwargs))
    output_dir = tmp_path / "degrader"
    args = _with_data(_base_args(tiny_base, pair_data, output_dir, "--max_train_steps", 2, "--direction", "degrade",
                                 "--degradation", "jpeg"), "--train_data_dir", pair_data / "clean")
    _run(args)
    assert prompts and all(p.startswith("Degrade with JPEG compression. Severity: mean ") for p in prompts if p)
    index = json.loads((output_dir / "model_index.json").read_text())
    assert index["_class_name"] == "SanaDegradationPipeline" and index["direction"] == "degrade"
    assert index["sampling_defaults"]["restoration_guidance"] == 0.0
    with pytest.raises(ValueError, match="load it with SanaDegradationPipeline"):
        SanaRestorationPipeline.from_pretrained(str(output_dir))
    SanaDegradationPipeline.from_pretrained(str(output_dir))

    assert "--validation_prompt" in _refusal(capsys, args + ["--validation_image", str(pair_data / "clean" / "0.png")])
    _reset_accelerate()
    with pytest.raises(ValueError, match="was trained to degrade images, not --direction restore"):
        _run(_base_args(output_dir, pair_data, tmp_path / "restorer", "--max_train_steps", 1))

    # a latent cache records the direction: a restore run's cache is not reused by a degrade run
    cache = tmp_path / "cache"
    restore_cached = [arg for arg in args if arg not in ("--direction", "degrade")] + [
        "--cache_latents", "--latent_cache_dir", str(cache), "--output_dir", str(tmp_path / "r2")]
    _reset_accelerate()
    _run(restore_cached)
    _reset_accelerate()
    with pytest.raises(LatentCacheError, match="direction"):
        _run(args + ["--cache_latents", "--latent_cache_dir", str(cache), "--output_dir", str(tmp_path / "d2")])
