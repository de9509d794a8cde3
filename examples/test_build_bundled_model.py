"""Checks of examples/build_bundled_model.py that run in seconds: the base folder it assembles, the photos it trains
on, and that the training scripts accept every stage's recipe (shortened) in turn and leave every file the package
ships."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import build_bundled_model as build  # noqa: E402


def _shorten(args: list[str]) -> list[str]:
    args = list(args)
    for key, value in dict(max_train_steps=1, repeats=1, train_batch_size=2, resolution=32).items():
        args[args.index(f"--{key}") + 1] = str(value)
    return args


def _fake_corpus(root) -> str:
    """A corpus folder of the real layout: train / validation / held_out photos (one large, to be halved)."""
    rng = np.random.default_rng(0)
    sizes = {"train": [(80, 96), (2100, 1100)], "validation": [(64, 64)], "held_out": [(64, 64)]}
    for split, shapes in sizes.items():
        (root / split).mkdir(parents=True)
        for number, (height, width) in enumerate(shapes):
            array = (rng.random((height, width, 3)) * 255).astype(np.uint8)
            Image.fromarray(array).save(root / split / f"source__photo{number}.png")
    return str(root)


def test_photos_base_folder_and_every_training_stage(tmp_path):
    from diffusers import SanaPipeline

    from diffusers_restore import SanaRestorationPipeline
    from diffusers_restore.testing import get_tiny_vae

    corpus = _fake_corpus(tmp_path / "corpus")
    photos = build.write_training_photos(corpus, str(tmp_path / "photos"))
    sizes = sorted(Image.open(os.path.join(photos, name)).size for name in os.listdir(photos))
    assert sizes == [(96, 80), (550, 1050)]  # the train split only; the large photo halved once (short side <= 1024)
    assert all(name.endswith(".bmp") for name in os.listdir(photos))

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

    # Every stage's recipe, shortened: its script accepts it and continues from the previous stage's folder.
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    previous = base
    for name, script, recipe in build.TRAINING_STAGES:
        output = tmp_path / name
        subprocess.run([sys.executable, os.path.join(build.HERE, script), "--pretrained_model_name_or_path",
                        str(previous), "--train_data_dir", photos, "--output_dir", str(output), "--seed", "0",
                        *_shorten(recipe)], check=True, env=env, capture_output=True)
        assert build._complete(str(output)), name
        previous = output
    for name in build.SHIPPED:
        assert (previous / name).exists(), name
    final = SanaRestorationPipeline.from_pretrained(previous)
    assert final.degradation_removal is not None
    assert final.config.sampling_defaults == {"num_inference_steps": 1, "guidance_scale": 1.0, "fidelity": 1.0}
    assert final.degradation_removal.config.statistics_input is True
    assert final.transformer.config.condition_residual is True  # the one-step stage started from the condition

    # The shipped folder names no local path and says what the model is, on the last train_paired.py stage's card.
    shipped = tmp_path / "shipped"
    build.install(str(previous), str(shipped), num_train_photos=2, card=str(tmp_path / "one_step" / "README.md"))
    for config in [*shipped.rglob("config.json"), shipped / "model_index.json"]:
        assert str(tmp_path) not in config.read_text(), config
    card = (shipped / "README.md").read_text()
    assert "trained as a one-step restorer" in card and "The stage alone" not in card  # the pipeline's card, not the stage's
    assert base not in card and str(tmp_path) not in card and "restorer bundled with diffusers-restore" in card
    assert all(setting in card for setting in ("num_inference_steps=1", "guidance_scale=1.0", "fidelity=1.0"))
    assert "8 layers, hidden 128, patch" in card and "training split of the project's photo corpus" in card
