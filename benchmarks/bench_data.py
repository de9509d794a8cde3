"""Data pipeline: degradation throughput per core, and the latent cache against encoding on the fly.

    python benchmarks/bench_data.py --scale tiny                 # about a minute on a laptop CPU
    python benchmarks/bench_data.py --scale real                 # + DC-AE f32c32 (random weights) at 512 px
    python benchmarks/bench_data.py --scale real --device cuda

Measured in one run (machines are noisy, so the cache figure is a ratio):

1. Degradations at 512 x 512 (real photos from scikit-image, centre crops): pairs per second per core for
   `random_degradation` (the seed pipeline; target >= 40), the `realesrgan` and `realesrgan_light` presets, and each
   single degradation. "Per core" = pairs / CPU seconds of this single-threaded process (`time.process_time`), which
   stays meaningful on a loaded machine; the wall-clock rate is printed beside it.
2. `PairedDataset` items per second per core (PNG decode, crop, flip, random degradation, prompt, tensors) at 512 px.
3. Latent cache vs on the fly: samples (clean + degraded latent pair, prompt) per second read from a
   `CachedLatentDataset` against a `PairedDataset` pass followed by `vae.encode` of both images, both single-process
   (num_workers=0), wall clock; the encode uses all torch threads, the cache is read with one (as a DataLoader
   worker would). Target: cache >= 10x. At tiny scale the VAE is `testing.get_tiny_vae()`; at real scale
   also DC-AE f32c32 (`testing.real_dc_ae_config()`: diffusers' `AutoencoderDC()` defaults are NOT f32c32: they
   use ResBlocks only, pixel-unshuffle downsampling and scaling factor 1.0), a few 512 px samples.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from run_all import emit_results  # noqa: E402

from diffusers_restore.data import degradations as D  # noqa: E402
from diffusers_restore.data.latents import CachedLatentDataset, build_latent_cache, encode_latents  # noqa: E402
from diffusers_restore.data.paired_dataset import PairedDataset, collate_fn  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")


def load_photos(min_side: int = 512) -> list[Image.Image]:
    """scikit-image's photos as RGB, resized up where needed so that the short side is at least `min_side`."""
    from skimage import data

    photos = []
    for name in PHOTOS:
        image = Image.fromarray(np.ascontiguousarray(getattr(data, name)()[..., :3])).convert("RGB")
        short = min(image.size)
        if short < min_side:
            scale = min_side / short
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
        photos.append(image)
    return photos


def centre_crop(image: Image.Image, size: int) -> Image.Image:
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def rate(function, inputs, min_seconds: float, max_calls: int) -> tuple[float, float, int]:
    """(calls per CPU second, calls per wall second, calls) of function(input, rng) cycling over inputs."""
    rng = np.random.default_rng(0)
    function(inputs[0], rng)  # warm-up (lazy tables)
    calls, cpu_start, wall_start = 0, time.process_time(), time.perf_counter()
    while calls < max_calls and (calls < 5 or time.process_time() - cpu_start < min_seconds):
        function(inputs[calls % len(inputs)], rng)
        calls += 1
    cpu, wall = time.process_time() - cpu_start, time.perf_counter() - wall_start
    return calls / cpu, calls / wall, calls


def _single(image, rng, function):
    return function(image, rng=rng)


def bench_degradations(crops: list[Image.Image], quick: bool) -> list[dict]:
    rows = []
    cases = [
        ("random_degradation", lambda image, rng: D.random_degradation(image, rng=rng), 40.0, 300),
        ("realesrgan", lambda image, rng: D.realesrgan_degradation(image, rng=rng), None, 40),
        ("realesrgan_light", lambda image, rng: D.realesrgan_degradation(image, rng, "realesrgan_light"), None, 40),
    ]
    for name, function in D.DEGRADATIONS.items():
        cases.append((name, functools.partial(_single, function=function), None, 200))
    print(f"\n1. degradations at 512 x 512 ({len(crops)} photos), single process")
    print(f"   {'degradation':<20} {'pairs/s/core':>13} {'pairs/s wall':>13} {'calls':>6}")
    for name, function, target, max_calls in cases:
        per_core, wall, calls = rate(function, crops, 1.0 if quick else 2.0, max_calls)
        note = f"   target >= {target:g}" if target else ""
        print(f"   {name:<20} {per_core:13.1f} {wall:13.1f} {calls:6d}{note}")
        rows.append(dict(metric=f"{name} pairs/s/core @512", value=per_core, unit="pairs/s", target=target,
                         better="higher"))
    return rows


def write_photo_folder(photos: list[Image.Image], folder: str, count: int) -> None:
    os.makedirs(folder, exist_ok=True)
    for number in range(count):
        photo = photos[number % len(photos)]
        if number >= len(photos):
            photo = photo.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        photo.save(os.path.join(folder, f"{number:03d}.png"), compress_level=1)


def bench_dataset(folder: str, quick: bool) -> list[dict]:
    dataset = PairedDataset(folder, resolution=512, degradation="random", seed=0)
    per_core, wall, calls = rate(lambda index, rng: dataset[index], list(range(len(dataset))), 1.0 if quick else 2.0,
                                 100)
    print("\n2. PairedDataset, on-the-fly 'random' at 512 px (PNG decode, crop, flip, degrade, prompt, tensors)")
    print(f"   {per_core:.1f} items/s/core, {wall:.1f} items/s wall ({calls} items)")
    return [dict(metric="PairedDataset on-the-fly items/s/core @512", value=per_core, unit="items/s", target=None,
                 better="higher")]


@torch.no_grad()
def on_the_fly_rate(dataset, vae, batch_size: int, device: str) -> tuple[float, int]:
    """Samples per second (wall) of dataset items + VAE encode of both images, num_workers=0."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=0, collate_fn=collate_fn)
    dtype = next(vae.parameters()).dtype
    start, samples = time.perf_counter(), 0
    for batch in loader:
        pixels = torch.cat([batch["pixel_values"], batch["conditioning_pixel_values"]]).to(device, dtype)
        latents = encode_latents(vae, pixels)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        samples += batch["pixel_values"].shape[0]
        del latents
    return samples / (time.perf_counter() - start), samples


def cache_rate(cache_dir: str, batch_size: int, device: str, min_seconds: float = 1.0) -> tuple[float, int]:
    """Samples per second (wall) read from the cache with a DataLoader (num_workers=0), moved to `device`."""
    cached = CachedLatentDataset(cache_dir, load_prompt_embeds=False)
    loader = torch.utils.data.DataLoader(cached, batch_size=batch_size, num_workers=0)
    # Collating is a memory copy; with one thread, as in a DataLoader worker. (With 2 intra-op threads on a loaded
    # 2-core machine, torch.stack of 1 MB took 60 ms instead of 0.1 ms: OpenMP waiting on a busy core.)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start, samples = time.perf_counter(), 0
        while samples < 5 * len(cached) or time.perf_counter() - start < min_seconds:
            for batch in loader:
                latents = batch["latents"].to(device), batch["conditioning_latents"].to(device)
                samples += latents[0].shape[0]
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        return samples / (time.perf_counter() - start), samples
    finally:
        torch.set_num_threads(threads)


def bench_cache(name: str, vae, folder: str, num_samples: int, batch_size: int, device: str, work: str) -> list[dict]:
    vae = vae.to(device).eval()
    dataset = PairedDataset(folder, resolution=512, degradation="random", seed=0)
    dataset.rows = dataset.rows[:num_samples]
    fly, fly_samples = on_the_fly_rate(dataset, vae, batch_size, device)
    cache_dir = os.path.join(work, f"cache-{name}")
    start = time.perf_counter()
    build_latent_cache(dataset, vae, cache_dir, batch_size=batch_size, shard_size=max(2, num_samples // 2),
                       device=device)
    build_seconds = time.perf_counter() - start
    cached, cached_samples = cache_rate(cache_dir, batch_size, device)
    ratio = cached / fly
    print(f"\n3. latent cache vs on the fly, {name}, 512 px, batch {batch_size}, {device}")
    print(f"   on the fly: {fly:.3g} samples/s ({fly_samples} samples: PairedDataset + encode of both images)")
    print(f"   cache build: {build_seconds:.1f} s for {num_samples} samples (encode + checksummed shards + index)")
    print(f"   cache read:  {cached:.3g} samples/s ({cached_samples} samples)")
    print(f"   speed-up:    {ratio:.1f}x   target >= 10")
    return [
        dict(metric=f"latent cache speed-up vs on-the-fly encode ({name}, 512 px)", value=ratio, unit="x",
             target=10.0, better="higher"),
        dict(metric=f"on-the-fly encode samples/s ({name}, 512 px, {device})", value=fly, unit="samples/s",
             target=None, better="higher"),
        dict(metric=f"latent cache read samples/s ({name}, 512 px, {device})", value=cached, unit="samples/s",
             target=None, better="higher"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=["tiny", "real"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="Shorter timing loops (smoke test of the script).")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"bench_data: scale={args.scale} device={args.device} torch threads={torch.get_num_threads()} "
          f"cpus={os.cpu_count()} load average={os.getloadavg()[0]:.1f}")

    photos = load_photos()
    crops = [centre_crop(photo, 512) for photo in photos]
    rows = bench_degradations(crops, args.quick)
    with tempfile.TemporaryDirectory() as work:
        folder = os.path.join(work, "photos")
        write_photo_folder(photos, folder, 16)
        rows += bench_dataset(folder, args.quick)

        from diffusers_restore.testing import get_tiny_vae

        rows += bench_cache("tiny VAE", get_tiny_vae(), folder, 8, 4, args.device, work)
        if args.scale == "real":
            from diffusers import AutoencoderDC

            from diffusers_restore.testing import real_dc_ae_config

            vae = AutoencoderDC(**real_dc_ae_config())
            # On a CPU one 512 px DC-AE encode takes tens of seconds: one sample (two encodes) each way suffices.
            count = 16 if args.device.startswith("cuda") else 1
            rows += bench_cache("DC-AE f32c32", vae, folder, count, min(count, 4), args.device, work)
    emit_results(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
