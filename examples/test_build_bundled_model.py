"""Checks of examples/build_bundled_model.py that run in seconds: the base folder it assembles, the photos it trains
on, and that train_paired.py accepts both with the recipe's own flags and leaves every file the package ships."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("skimage", reason="the training photos come from scikit-image")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import build_bundled_model as build  # noqa: E402
from diffusers_restore.sample_photos import GREY_TRAIN_PHOTOS, HELD_OUT_PHOTOS, TRAIN_PHOTOS  # noqa: E402


def _override(args: list[str], **values) -> list[str]:
    args = list(args)
    for key, value in values.items():
        args[args.index(f"--{key}") + 1] = str(value)
    return args


def test_base_folder_photos_and_one_training_step(tmp_path):
    from diffusers import SanaPipeline

    from diffusers_restore.testing import get_tiny_vae

    get_tiny_vae().save_pretrained(tmp_path / "vae")
    base = build.build_base_pipeline(str(tmp_path / "vae"), str(tmp_path / "base"), seed=0)
    pipe = SanaPipeline.from_pretrained(base)
    for key, value in build.TRANSFORMER_CONFIG.items():
        assert pipe.transformer.config[key] == value, key
    assert pipe.transformer.config.in_channels == pipe.vae.config.latent_channels == 4
    assert pipe.scheduler.config.flow_shift == 3.0
    # deterministic: the same seed gives the same weights
    again = build.build_base_pipeline(str(tmp_path / "vae"), str(tmp_path / "base2"), seed=0)
    first, second = pipe.transformer.state_dict(), SanaPipeline.from_pretrained(again).transformer.state_dict()
    assert all(first[k].equal(second[k]) for k in first)

    photos = build.write_training_photos(str(tmp_path / "photos"))
    names = sorted(os.path.splitext(name)[0] for name in os.listdir(photos))
    assert names == sorted(TRAIN_PHOTOS) and not set(names) & set(HELD_OUT_PHOTOS)

    # The recipe's flags, shortened: train_paired accepts the base folder and writes everything the package ships.
    args = _override(build.TRAIN_ARGS, max_train_steps=2, repeats=1, train_batch_size=2, checkpointing_steps=1000)
    output = tmp_path / "restorer"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, os.path.join(build.HERE, "train_paired.py"), "--pretrained_model_name_or_path",
                    base, "--train_data_dir", photos, "--output_dir", str(output), "--seed", "0", *args],
                   check=True, env=env, capture_output=True)
    for name in build.SHIPPED:
        assert (output / name).exists(), name

    # Stage 4, shortened: the one-step recipe continues from that folder on the widened photo set.
    widened = build.write_training_photos(str(tmp_path / "widened"), widened=True)
    names = {os.path.splitext(name)[0] for name in os.listdir(widened)}
    assert names == set(TRAIN_PHOTOS) | {f"{n}_brg" for n in TRAIN_PHOTOS} | set(GREY_TRAIN_PHOTOS)
    assert not names & set(HELD_OUT_PHOTOS) and "cat" not in names  # cat is chelsea
    one_step = tmp_path / "one-step"
    args = _override(build.ONE_STEP_ARGS, max_train_steps=1, repeats=1, train_batch_size=2, checkpointing_steps=1000)
    subprocess.run([sys.executable, os.path.join(build.HERE, "train_paired.py"), "--pretrained_model_name_or_path",
                    str(output), "--train_data_dir", widened, "--output_dir", str(one_step), "--seed", "0", *args],
                   check=True, env=env, capture_output=True)
    output = one_step
    for name in build.SHIPPED:
        assert (output / name).exists(), name

    # The shipped folder names no local path and says what the model is.
    build.finalise_bundled_folder(str(output))
    for config in output.rglob("config.json"):
        assert str(tmp_path) not in config.read_text(), config
    card = (output / "README.md").read_text()
    assert base not in card and str(tmp_path) not in card and "restorer bundled with diffusers-restore" in card
    assert "num_inference_steps=1," in card and "then the 2500 steps" in card
    assert "8 layers, hidden 128, patch 2" in card
