"""Content captions: `ImageCaptioner` on a tiny random LLaVA built offline, `combine_prompt`, captioning a pairs CSV
(`sana-restore caption`, `make-pairs --caption-model`)."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from diffusers_restore.captioning import ImageCaptioner, combine_prompt, image_digest
from diffusers_restore.data.captions import caption_cache_file, caption_pairs
from diffusers_restore.testing import save_tiny_captioning_model


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    return save_tiny_captioning_model(tmp_path_factory.mktemp("vlm") / "tiny-llava")


@pytest.fixture
def pairs(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for index in range(3):
        clean = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
        Image.fromarray(clean).save(tmp_path / f"clean{index}.png")
        Image.fromarray(255 - clean).save(tmp_path / f"noisy{index}.png")
        rows.append([f"clean{index}.png", f"noisy{index}.png", "Remove the noise"])
    with open(tmp_path / "pairs.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_path", "condition_image_path", "caption"])
        writer.writerows(rows)
    return tmp_path / "pairs.csv"


def _count_generate(captioner, patch) -> list[int]:
    calls = []
    original = captioner._generate

    def counting(images):
        calls.append(len(images))
        return original(images)

    patch.setattr(captioner, "_generate", counting)
    return calls


def test_combine_prompt():
    assert combine_prompt("A cat on a sofa.", "Remove the noise") == "A cat on a sofa. Remove the noise"
    assert combine_prompt("  a   cat ", "Deblur") == "a cat. Deblur"
    assert combine_prompt("", "Deblur") == "Deblur"
    assert combine_prompt("A dog", "Denoise", template="{prompt}: {caption}") == "Denoise: A dog"
    with pytest.raises(ValueError, match="caption"):
        combine_prompt("A dog", "Denoise", template="{prompt}")
    with pytest.raises(ValueError, match="only use"):
        combine_prompt("A dog", "Denoise", template="{caption} {other}")


def test_captioner_is_deterministic_batched_and_cached(vlm, tmp_path, monkeypatch):
    images = [Image.new("RGB", (30, 20), (10 * i, 50, 90)) for i in range(5)]
    captioner = ImageCaptioner(vlm, batch_size=2, max_new_tokens=6, cache_file=tmp_path / "cache.jsonl")
    calls = _count_generate(captioner, monkeypatch)
    first = captioner.caption(images + [images[0]])  # a repeated image is captioned once
    assert calls == [2, 2, 1] and len(first) == 6 and first[5] == first[0]
    assert all(isinstance(text, str) for text in first)
    assert captioner.caption(images) == first[:5] and calls == [2, 2, 1]  # all from the cache
    # a new captioner resumes from the cache file; another instruction is another key
    again = ImageCaptioner(vlm, batch_size=2, max_new_tokens=6, cache_file=tmp_path / "cache.jsonl")
    again_calls = _count_generate(again, monkeypatch)
    assert again.caption(images) == first[:5] and again_calls == []
    other = ImageCaptioner(vlm, instruction="What is this?", max_new_tokens=6, cache_file=tmp_path / "cache.jsonl")
    other_calls = _count_generate(other, monkeypatch)
    other.caption(images[:1])
    assert other_calls == [1]
    # the same picture in another format or mode is the same image
    assert image_digest(images[0]) == image_digest(images[0].convert("RGBA"))


def test_a_torn_cache_line_is_ignored_and_a_broken_one_named(vlm, tmp_path):
    (tmp_path / "torn.jsonl").write_text('{"key": "a", "caption": "x"}\n{"key": "b", "capt')
    assert ImageCaptioner(vlm, cache_file=tmp_path / "torn.jsonl").cache == {"a": "x"}
    (tmp_path / "broken.jsonl").write_text('not json\n{"key": "a", "caption": "x"}\n')
    with pytest.raises(ValueError, match=r"broken.jsonl, line 1"):
        ImageCaptioner(vlm, cache_file=tmp_path / "broken.jsonl")


def test_caption_pairs_describes_the_degraded_image_by_default(vlm, pairs, tmp_path, monkeypatch):
    output = tmp_path / "out" / "captioned.csv"
    output.parent.mkdir()
    captioner = ImageCaptioner(vlm, max_new_tokens=4, cache_file=caption_cache_file(output))
    described = []
    original = captioner._generate
    monkeypatch.setattr(captioner, "_generate", lambda images: described.extend(map(image_digest, images)) or
                        original(images))
    assert caption_pairs(pairs, output, captioner) == 3
    noisy = [image_digest(Image.open(pairs.parent / f"noisy{i}.png")) for i in range(3)]
    assert described == noisy
    with open(output, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["image_path", "condition_image_path", "caption"]
    assert rows[1][0] == "../clean0.png" and rows[1][1] == "../noisy0.png"
    expected = combine_prompt(captioner.caption([Image.open(pairs.parent / "noisy0.png")])[0], "Remove the noise")
    assert rows[1][2] == expected and rows[1][2].endswith("Remove the noise")
    described.clear()
    caption_pairs(pairs, tmp_path / "clean.csv", captioner, source="clean")
    assert described == [image_digest(Image.open(pairs.parent / f"clean{i}.png")) for i in range(3)]
    with pytest.raises(ValueError, match="is the input"):
        caption_pairs(pairs, pairs, captioner)


def test_cli_caption_and_make_pairs_caption_model(vlm, pairs, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "diffusers_restore.cli"]
    result = subprocess.run(command + ["caption", str(pairs), "-o", str(tmp_path / "c.csv"), "--caption-model", vlm,
                                       "--max-new-tokens", "4"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert os.path.isfile(tmp_path / "c.csv.captions.jsonl")
    result = subprocess.run(command + ["caption", str(pairs), "-o", str(pairs), "--caption-model", vlm],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 2 and "is the input" in result.stderr
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (40, 40), (200, 100, 50)).save(tmp_path / "photos" / "a.png")
    result = subprocess.run(command + ["make-pairs", "--input-dir", str(tmp_path / "photos"), "--output-dir",
                                       str(tmp_path / "made"), "--degradation", "jpeg:20", "--workers", "1",
                                       "--caption-model", vlm, "--quiet"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "made" / "pairs.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert len(rows) == 2 and rows[1][2].count(". ") >= 1
