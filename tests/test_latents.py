"""Latent-space degradation and the latent cache (round trip, dedup, integrity, resume, settings checks)."""

import json
import os
import shutil

import pytest
import torch
from PIL import Image

from diffusers_restore.data.latents import (
    CachedLatentDataset,
    LatentCacheError,
    build_latent_cache,
    degrade_latents,
    encode_latents,
    vae_fingerprint,
)
from diffusers_restore.data.paired_dataset import PairedDataset
from diffusers_restore.testing import get_tiny_vae


# ----------------------------------------------------------------------------------------- degrade_latents


def test_degrade_latents_per_sample_sigma():
    latents = torch.randn(6, 4, 64, 64)
    generator = torch.Generator().manual_seed(0)
    noisy, sigmas = degrade_latents(latents, max_sigma=0.12, generator=generator, return_sigmas=True)
    assert noisy.shape == latents.shape and noisy.dtype == latents.dtype and sigmas.shape == (6,)
    assert (sigmas >= 0).all() and (sigmas <= 0.12).all() and len(set(sigmas.tolist())) == 6
    measured = (noisy - latents).flatten(1).std(dim=1)
    assert torch.allclose(measured, sigmas, rtol=0.03, atol=1e-4)
    again = degrade_latents(latents, max_sigma=0.12, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, noisy)
    assert torch.equal(degrade_latents(latents, max_sigma=0.0), latents)
    half = degrade_latents(latents.to(torch.bfloat16), generator=torch.Generator().manual_seed(0))
    assert half.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="max_sigma"):
        degrade_latents(latents, max_sigma=-1)


# --------------------------------------------------------------------------------------------- encoding


def test_encode_latents_supports_latent_and_latent_dist_vaes():
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    dc = get_tiny_vae()
    assert torch.equal(encode_latents(dc, pixels), dc.encode(pixels).latent * dc.config.scaling_factor)
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    kl = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                       up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8).eval()
    expected = kl.encode(pixels).latent_dist.mode() * kl.config.scaling_factor
    assert torch.equal(encode_latents(kl, pixels), expected)


def test_vae_fingerprint_tracks_config_and_weights_not_paths():
    vae = get_tiny_vae(seed=0)
    fingerprint = vae_fingerprint(vae)
    vae.register_to_config(_name_or_path="somewhere/else")
    assert vae_fingerprint(vae) == fingerprint
    assert vae_fingerprint(get_tiny_vae(seed=1))["weights_sha256"] != fingerprint["weights_sha256"]
    assert vae_fingerprint(get_tiny_vae(seed=1))["config_sha256"] == fingerprint["config_sha256"]


# ------------------------------------------------------------------------------------------------ cache


def _prompt_encoder(calls):
    def encode(prompts):
        calls.append(list(prompts))
        embeds = torch.stack([torch.full((5, 6), float(sum(map(ord, p)) % 97)) for p in prompts])
        mask = torch.stack([torch.tensor([1] * (1 + len(p) % 4) + [0] * (4 - len(p) % 4)) for p in prompts])
        return embeds, mask

    return encode


class _CountingVAE(torch.nn.Module):
    """Wraps a VAE to count encode calls (to prove which shards a rebuild re-encodes)."""

    def __init__(self, vae):
        super().__init__()
        self.vae, self.calls = vae, 0

    @property
    def config(self):
        return self.vae.config

    def encode(self, pixels):
        self.calls += 1
        return self.vae.encode(pixels)


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    skimage_data = pytest.importorskip("skimage.data")
    folder = tmp_path_factory.mktemp("photos")
    for number, name in enumerate(["astronaut", "chelsea", "coffee", "rocket", "astronaut"]):
        image = Image.fromarray(getattr(skimage_data, name)()).resize((40, 36), Image.Resampling.BOX)
        image.rotate(90 * number).save(folder / f"{number}.png")
    return str(folder)


def test_cache_round_trip_is_exact_and_prompts_are_deduplicated(photo_folder, tmp_path):
    dataset = PairedDataset(photo_folder, resolution=32, seed=4, degradation="gaussian_noise:20")
    vae = get_tiny_vae()
    calls = []
    index = build_latent_cache(dataset, vae, tmp_path / "cache", batch_size=2, shard_size=2,
                               encode_prompt_fn=_prompt_encoder(calls))
    assert [entry["num_samples"] for entry in index["shards"]] == [2, 2, 1]
    assert not (tmp_path / "cache" / "progress.json").exists()
    items = [dataset[i] for i in range(len(dataset))]
    unique = list(dict.fromkeys(item["prompt"] for item in items))
    assert index["prompts"] == unique and len(unique) < len(items)  # phrasings repeat
    assert sum(len(batch) for batch in calls) == len(unique)  # each unique prompt encoded once

    cached = CachedLatentDataset(tmp_path / "cache", vae=vae, resolution=32)
    assert len(cached) == len(dataset)
    encoder = _prompt_encoder([])
    for number, item in enumerate(items):
        expected = encode_latents(vae, torch.stack([item["pixel_values"], item["conditioning_pixel_values"]]))
        got = cached[number]
        assert torch.equal(got["latents"], expected[0]) and torch.equal(got["conditioning_latents"], expected[1])
        assert got["prompt"] == item["prompt"] and got["index"] == number
        assert got["degradation"] == item["degradation"]
        embeds, mask = encoder([item["prompt"]])
        assert torch.equal(got["prompt_embeds"], embeds[0]) and torch.equal(got["prompt_attention_mask"], mask[0])
    batch = next(iter(torch.utils.data.DataLoader(cached, batch_size=3, num_workers=2)))
    assert batch["latents"].shape == (3, 4, 8, 8) and batch["prompt_embeds"].shape == (3, 5, 6)
    assert torch.equal(batch["latents"][2], cached[2]["latents"])

    # bfloat16 storage; a cache without prompt embeddings
    small = build_latent_cache(dataset, vae, tmp_path / "bf16", shard_size=8, dtype=torch.bfloat16)
    assert small["prompt_shards"] == []
    reader = CachedLatentDataset(tmp_path / "bf16", load_prompt_embeds=False)
    assert reader[0]["latents"].dtype == torch.bfloat16 and "prompt_embeds" not in reader[0]
    with pytest.raises(LatentCacheError, match="no prompt embeddings"):
        CachedLatentDataset(tmp_path / "bf16")


def test_damaged_or_unfinished_caches_are_detected_and_rebuilt(photo_folder, tmp_path):
    dataset = PairedDataset(photo_folder, resolution=32, seed=0)
    vae = _CountingVAE(get_tiny_vae())
    cache = tmp_path / "cache"
    index = build_latent_cache(dataset, vae, cache, batch_size=2, shard_size=2)
    reference = CachedLatentDataset(cache, load_prompt_embeds=False)
    expected = [reference[i]["latents"] for i in range(len(reference))]
    shard = cache / index["shards"][1]["file"]

    # a truncated shard
    shard.write_bytes(shard.read_bytes()[:-16])
    with pytest.raises(LatentCacheError, match=index["shards"][1]["file"]):
        CachedLatentDataset(cache, load_prompt_embeds=False)
    # a shard of the right size with one flipped byte: caught by the checksum
    vae.calls = 0
    build_latent_cache(dataset, vae, cache, batch_size=2, shard_size=2)
    assert vae.calls == 1  # only the damaged shard (2 samples, one batch) was re-encoded
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(LatentCacheError, match="sha256"):
        CachedLatentDataset(cache, load_prompt_embeds=False)
    CachedLatentDataset(cache, load_prompt_embeds=False, verify="size")  # a cheaper check does not see it
    build_latent_cache(dataset, vae, cache, batch_size=2, shard_size=2)
    rebuilt = CachedLatentDataset(cache, load_prompt_embeds=False)
    assert all(torch.equal(rebuilt[i]["latents"], expected[i]) for i in range(len(rebuilt)))

    # an interrupted build: the dataset fails in the third shard, leaving progress but no index
    class Failing(torch.utils.data.Dataset):
        def __init__(self, inner):
            self.inner, self.fail = inner, True
            self.resolution, self.seed, self.source, self.degradation = 32, 0, inner.source, inner.degradation

        def __len__(self):
            return len(self.inner)

        def __getitem__(self, i):
            if self.fail and i == 4:
                raise KeyboardInterrupt("simulated interruption")
            return self.inner[i]

    failing = Failing(dataset)
    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        build_latent_cache(failing, vae, fresh, batch_size=2, shard_size=2)
    assert not (fresh / "index.json").exists() and (fresh / "progress.json").exists()
    (fresh / ".tmp-latents-00002-of-00003.safetensors.abc").write_bytes(b"half a shard")
    with pytest.raises(LatentCacheError, match="unfinished"):
        CachedLatentDataset(fresh, load_prompt_embeds=False)
    failing.fail, vae.calls = False, 0
    build_latent_cache(failing, vae, fresh, batch_size=2, shard_size=2)
    assert vae.calls == 1  # the two finished shards were kept
    assert not any(name.startswith(".tmp-") for name in os.listdir(fresh))
    resumed = CachedLatentDataset(fresh, load_prompt_embeds=False)
    assert all(torch.equal(resumed[i]["latents"], expected[i]) for i in range(len(resumed)))


def test_items_are_private_copies_and_damaged_json_is_named(photo_folder, tmp_path):
    dataset = PairedDataset(photo_folder, resolution=32, seed=0)
    vae = get_tiny_vae()
    cache = tmp_path / "cache"
    build_latent_cache(dataset, vae, cache, shard_size=8)
    reader = CachedLatentDataset(cache, load_prompt_embeds=False)
    first = reader[1]["latents"]
    expected = first.clone()
    first.mul_(0).add_(7)  # a training step changing its batch in place
    assert torch.equal(reader[1]["latents"], expected)

    index_text = (cache / "index.json").read_text()
    (cache / "index.json").write_text(index_text[: len(index_text) // 2])  # cut short
    with pytest.raises(LatentCacheError, match=r"index\.json is not valid JSON \(.*line .*overwrite=True"):
        CachedLatentDataset(cache, load_prompt_embeds=False)
    with pytest.raises(LatentCacheError, match=r"index\.json is not valid JSON"):
        build_latent_cache(dataset, vae, cache, shard_size=8)
    build_latent_cache(dataset, vae, cache, shard_size=8, overwrite=True)  # rebuilt from scratch
    rebuilt = CachedLatentDataset(cache, load_prompt_embeds=False)
    assert torch.equal(rebuilt[1]["latents"], expected)


def test_caches_from_other_settings_are_refused(photo_folder, tmp_path):
    dataset = PairedDataset(photo_folder, resolution=32, seed=0)
    vae = get_tiny_vae(seed=0)
    build_latent_cache(dataset, vae, tmp_path / "cache", shard_size=8)
    with pytest.raises(LatentCacheError, match="weights_sha256"):
        CachedLatentDataset(tmp_path / "cache", vae=get_tiny_vae(seed=1), load_prompt_embeds=False)
    with pytest.raises(LatentCacheError, match="resolution: cache has 32, expected 64"):
        CachedLatentDataset(tmp_path / "cache", resolution=64, load_prompt_embeds=False)
    with pytest.raises(LatentCacheError, match="other settings"):
        build_latent_cache(dataset, get_tiny_vae(seed=1), tmp_path / "cache", shard_size=8)
    other_resolution = PairedDataset(photo_folder, resolution=64, seed=0)
    with pytest.raises(LatentCacheError, match="resolution"):
        build_latent_cache(other_resolution, vae, tmp_path / "cache", shard_size=8)
    build_latent_cache(other_resolution, vae, tmp_path / "cache", shard_size=8, overwrite=True)
    reader = CachedLatentDataset(tmp_path / "cache", vae=vae, resolution=64, load_prompt_embeds=False)
    assert reader[0]["latents"].shape == (4, 16, 16)
    with open(tmp_path / "cache" / "index.json") as handle:
        metadata = json.load(handle)["metadata"]
    assert metadata["dataset_length"] == 5 and metadata["seed"] == 0 and metadata["vae"]["scaling_factor"] == 0.41407
    with pytest.raises(LatentCacheError, match="no cache index"):
        CachedLatentDataset(tmp_path / "nothing")


def _assert_same_shards(folder_a, index_a, folder_b, index_b):
    """Same shard files with the same tensors and metadata (safetensors orders header metadata arbitrarily, so the
    bytes, hence the sha256, may differ between equal files)."""
    from safetensors import safe_open

    assert [entry["file"] for entry in index_a["shards"]] == [entry["file"] for entry in index_b["shards"]]
    for entry in index_a["shards"]:
        with safe_open(str(folder_a / entry["file"]), "pt") as a, safe_open(str(folder_b / entry["file"]), "pt") as b:
            assert a.metadata() == b.metadata() and set(a.keys()) == set(b.keys())
            for key in a.keys():
                assert torch.equal(a.get_tensor(key), b.get_tensor(key)), (entry["file"], key)


def test_processes_build_their_shares_and_the_merge_is_the_single_process_cache(photo_folder, tmp_path):
    """Two processes (threads with a barrier here), each encoding its share of the shards into its own progress
    file, then process 0 merging: the same files and index as one process writes; resumable with another count."""
    import threading

    dataset = PairedDataset(photo_folder, resolution=32, seed=4, degradation="gaussian_noise:20")
    vae = get_tiny_vae()
    single = build_latent_cache(dataset, vae, tmp_path / "single", batch_size=2, shard_size=2,
                                encode_prompt_fn=_prompt_encoder([]))

    def build(folder, num_processes):
        barrier = threading.Barrier(num_processes)
        results, errors = [None] * num_processes, []

        def run(rank):
            try:
                results[rank] = build_latent_cache(
                    dataset, vae, folder, batch_size=2, shard_size=2, encode_prompt_fn=_prompt_encoder([]),
                    process_index=rank, num_processes=num_processes, wait_for_everyone=barrier.wait)
            except Exception as error:  # noqa: BLE001 - re-raised in the test thread
                errors.append(error)
                barrier.abort()

        threads = [threading.Thread(target=run, args=(rank,)) for rank in range(num_processes)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        if errors:
            raise errors[0]
        return results

    counters = {}
    encode = vae.encode

    def counting_encode(pixels):  # which "process" (thread) encoded how many batches
        name = threading.current_thread().name
        counters[name] = counters.get(name, 0) + 1
        return encode(pixels)

    vae.encode = counting_encode
    merged = build(tmp_path / "two", 2)
    del vae.encode
    assert merged[0] == merged[1]
    _assert_same_shards(tmp_path / "two", merged[0], tmp_path / "single", single)
    assert merged[0]["prompts"] == single["prompts"]
    assert sorted(counters.values()) == [1, 2]  # one thread: shards 0 and 2 (2 + 1 samples, batch 2); one: shard 1
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "single"))  # no progress files left
    cached, reference = CachedLatentDataset(tmp_path / "two", vae=vae), CachedLatentDataset(tmp_path / "single")
    for number in range(len(dataset)):
        assert torch.equal(cached[number]["latents"], reference[number]["latents"])

    # interrupted after process 1 wrote its shard: a single process finishes it without re-encoding that shard
    partial = tmp_path / "partial"
    build(partial, 2)
    os.remove(partial / "index.json")
    shutil.copy(tmp_path / "two" / "latents-00001-of-00003.safetensors", partial)
    for name in os.listdir(partial):
        if name.startswith("latents-0000") and name != "latents-00001-of-00003.safetensors":
            os.remove(partial / name)
    entry = next(e for e in merged[0]["shards"] if e["file"] == "latents-00001-of-00003.safetensors")
    (partial / "progress-1.json").write_text(json.dumps({"metadata": merged[0]["metadata"],
                                                         "shards": {entry["file"]: entry}, "prompt_shards": {}}))
    counters.clear()
    vae.encode = counting_encode
    resumed = build_latent_cache(dataset, vae, partial, batch_size=2, shard_size=2, encode_prompt_fn=_prompt_encoder([]))
    del vae.encode
    assert sum(counters.values()) == 2  # shards 0 and 2 only (2 + 1 samples, batch 2)
    _assert_same_shards(partial, resumed, tmp_path / "single", single)
