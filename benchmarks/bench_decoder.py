"""Decoder quality and cost (examples/train_decoder.py outputs), recorded in BENCHMARKS.md.

    # robustness: PSNR/SSIM of decode(encode(x) + sigma * noise) per decoder, sigma in the scaled latent space
    python benchmarks/bench_decoder.py robustness --images corpus/held_out --crop 256 \\
        --vae base=build/base/vae --vae robust=decoder-run/vae [--denoise-decoded nlm,bm3d]
    # 2x: an upscale decoder against resizing the decoded half-size image and against pipe(image, upscale=2)
    python benchmarks/bench_decoder.py upscale --images corpus/held_out --crop 256 \\
        --pipeline PIPELINE_WITH_UPSCALE_DECODER
    # how much latent noise does to a latent's structure: PCA of clean vs noisy latents
    python benchmarks/bench_decoder.py pca --images corpus/validation --crop 256 --vae build/base/vae
    # one training step at real DC-AE f32c32 shapes (random weights), bf16 autocast, gradient checkpointing
    python benchmarks/bench_decoder.py real-step --resolution 512

Every figure is a mean over the photos' centre crops; the noise is seeded per photo, so two decoders see the same
noisy latents.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))


def _crops(folder: str, crop: int) -> list[tuple[str, torch.Tensor]]:
    """Every photo's centre crop (train_decoder.py's validation crops: sides a multiple of 64) as `(1, 3, H, W)`
    in [-1, 1]."""
    from accelerate import PartialState

    from diffusers_restore.data.paired_dataset import image_to_tensor
    from train_decoder import load_validation_images

    PartialState()  # the script's accelerate logger (which reports skipped photos) needs a process state
    return [(name, image_to_tensor(photo)[None]) for name, photo in load_validation_images(folder, sys.maxsize, crop, 64)]


def _score(output: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """PSNR and SSIM of images in [-1, 1], quantised to 8 bits as a saved result would be."""
    from diffusers_restore.metrics import psnr, ssim

    def to01(x):
        return torch.round(((x.float() + 1) / 2).clamp(0, 1) * 255) / 255

    return float(psnr(to01(output), to01(target))), float(ssim(to01(output), to01(target)))


def _denoise_decoded(name: str, decoded: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """A classical denoiser (`nlm` or `bm3d`, `diffusers_restore.baselines`) applied to a decoded image `(1, 3, H, W)`
    in [-1, 1], given the true standard deviation of its error against `clean` as the noise level: a generous ceiling
    for what removing the decoded latent noise after decoding can gain (that error is not white, so an estimate from
    the image alone would do worse)."""
    from PIL import Image

    from diffusers_restore import baselines

    def to_pil(x):
        return Image.fromarray((((x[0].float() + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))

    sigma = float(((decoded.float() - clean.float()) / 2).std())
    denoise = {"nlm": baselines.non_local_means, "bm3d": baselines.cbm3d}[name]
    output = np.asarray(denoise(to_pil(decoded), noise_sigma=max(sigma, 1e-4)), dtype=np.float32) / 255
    return torch.from_numpy(output).permute(2, 0, 1)[None] * 2 - 1


@torch.no_grad()
def robustness(args) -> dict:
    from diffusers import AutoencoderDC

    from diffusers_restore.models.vae_latents import decode_latents, encode_latents

    vaes = {}
    for item in args.vae:
        label, path = item.split("=", 1)
        vaes[label] = AutoencoderDC.from_pretrained(path, use_safetensors=True).eval()
    photos = _crops(args.images, args.crop)
    encoder_vae = next(iter(vaes.values()))  # the encoders are identical (train_decoder.py never trains them)
    first = next(iter(vaes))
    denoisers = [name for name in (args.denoise_decoded or "").split(",") if name]
    rows = {label: {sigma: [] for sigma in args.sigmas} for label in vaes}
    rows.update({f"{first} + {name} (true noise level)": {sigma: [] for sigma in args.sigmas} for name in denoisers})
    for index, (_, image) in enumerate(photos):
        latents = encode_latents(encoder_vae, image)
        for sigma in args.sigmas:
            noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(index))
            for label, vae in vaes.items():
                decoded = decode_latents(vae, latents + sigma * noise)
                rows[label][sigma].append(_score(decoded, image))
                if label == first:
                    for name in denoisers:
                        rows[f"{first} + {name} (true noise level)"][sigma].append(
                            _score(_denoise_decoded(name, decoded, image), image))
    table = {label: {f"{sigma:g}": [float(np.mean([p for p, _ in v])), float(np.mean([s for _, s in v]))]
                     for sigma, v in per_sigma.items()} for label, per_sigma in rows.items()}
    print("| decoder | " + " | ".join(f"sigma {s:g}" for s in args.sigmas) + " |")
    print("|---|" + "---|" * len(args.sigmas))
    for label, per_sigma in table.items():
        print(f"| {label} | " + " | ".join(f"{p:.2f} / {s:.4f}" for p, s in per_sigma.values()) + " |")
    return table


@torch.no_grad()
def upscale(args) -> dict:
    from diffusers_restore import SanaRestorationPipeline
    from diffusers_restore.models.vae_latents import decode_latents, encode_latents, unscale_latents

    pipe = SanaRestorationPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    if pipe.upscale_decoder is None:
        raise SystemExit(f"{args.pipeline} has no upscale_decoder (install one with sana-restore install-decoder).")
    scores: dict[str, list] = {}
    for _, target in _crops(args.images, args.crop):
        low = F.avg_pool2d(target, 2)  # the area-downsampled input
        latents = encode_latents(pipe.vae, low)
        decoded_low = decode_latents(pipe.vae, latents)
        candidates = {
            "upscale decoder": pipe.upscale_decoder(unscale_latents(pipe.vae, latents)).sample,
            "decoded half-size image, bicubic x2": F.interpolate(decoded_low, scale_factor=2, mode="bicubic"),
            "decoded half-size image, nearest x2 (area inverse)": F.interpolate(decoded_low, scale_factor=2),
            "input, bicubic x2 (no model)": F.interpolate(low, scale_factor=2, mode="bicubic"),
        }
        low01 = (low + 1) / 2
        kwargs = dict(output_type="pt", color_fix=None)
        with_decoder = pipe(low01, upscale=2, **kwargs).images
        upscale_decoder, pipe.upscale_decoder = pipe.upscale_decoder, None
        candidates["pipe(image, upscale=2), resize first (no upscale decoder)"] = pipe(low01, upscale=2, **kwargs).images * 2 - 1
        pipe.upscale_decoder = upscale_decoder
        candidates["pipe(image, upscale=2) with the upscale decoder"] = with_decoder * 2 - 1
        for name, output in candidates.items():
            scores.setdefault(name, []).append(_score(output, target))
    table = {name: [float(np.mean([p for p, _ in v])), float(np.mean([s for _, s in v]))] for name, v in scores.items()}
    print("| 2x method | PSNR / SSIM |\n|---|---|")
    for name, (p, s) in table.items():
        print(f"| {name} | {p:.2f} / {s:.4f} |")
    return table


@torch.no_grad()
def pca(args) -> dict:
    """Principal components of the clean latents' channels (over all latent pixels of all photos); for each sigma,
    the share of the noisy latents' variance the clean top-3 components explain, and the correlation of the noisy
    and clean first-component maps (1 = the structure the first component carries is intact)."""
    from diffusers import AutoencoderDC

    from diffusers_restore.models.vae_latents import encode_latents

    vae = AutoencoderDC.from_pretrained(args.vae, use_safetensors=True).eval()
    clean = [encode_latents(vae, image) for _, image in _crops(args.images, args.crop)]
    pixels = torch.cat([z.flatten(2).transpose(1, 2).reshape(-1, z.shape[1]) for z in clean])
    mean = pixels.mean(0)
    _, singular, components = torch.linalg.svd(pixels - mean, full_matrices=False)
    explained = singular**2 / (singular**2).sum()
    top = components[:3]
    result = {"clean_top3_explained": float(explained[:3].sum())}
    for sigma in args.sigmas:
        noisy = torch.cat([
            (z + sigma * torch.randn(z.shape, generator=torch.Generator().manual_seed(i))).flatten(2).transpose(1, 2)
            .reshape(-1, z.shape[1]) for i, z in enumerate(clean)
        ])
        centred = noisy - mean
        share = float((centred @ top.T).square().sum() / centred.square().sum())
        pc1_clean, pc1_noisy = (pixels - mean) @ components[0], centred @ components[0]
        correlation = float(torch.corrcoef(torch.stack([pc1_clean, pc1_noisy]))[0, 1])
        result[f"sigma_{sigma:g}"] = {"top3_share": share, "pc1_correlation": correlation}
    print(json.dumps(result, indent=1))
    return result


def real_step(args) -> dict:
    from diffusers import AutoencoderDC

    from diffusers_restore.testing import real_dc_ae_config
    from train_decoder import CheckpointedDCDecoder, vae_encoder_distance

    torch.manual_seed(0)
    vae = AutoencoderDC(**real_dc_ae_config()).to(torch.bfloat16)
    vae.requires_grad_(False)
    model = CheckpointedDCDecoder(vae.decoder)
    model.decoder.requires_grad_(True)
    model.gradient_checkpointing = True
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    target = torch.rand(1, 3, args.resolution, args.resolution) * 2 - 1
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        latents = vae.encode(target.to(torch.bfloat16)).latent
        prediction = model(latents + 0.06 / vae.config.scaling_factor * torch.randn_like(latents)).float()
        loss = F.l1_loss(prediction, target) + 0.1 * vae_encoder_distance(vae.encoder, prediction, target)
    loss.backward()
    optimizer.step()
    seconds = time.perf_counter() - start
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    decoder_parameters = sum(p.numel() for p in vae.decoder.parameters())
    result = {"resolution": args.resolution, "loss": float(loss), "seconds": seconds, "peak_rss_gib": peak_gib,
              "decoder_parameters": decoder_parameters, "finite": bool(torch.isfinite(loss))}
    print(json.dumps(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    robust = commands.add_parser("robustness")
    robust.add_argument("--images", required=True)
    robust.add_argument("--crop", type=int, default=256)
    robust.add_argument("--vae", action="append", required=True, help="label=folder of an AutoencoderDC, repeatable.")
    robust.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.03, 0.06, 0.12])
    robust.add_argument("--denoise-decoded", default=None,
                        help="Comma-separated classical denoisers (nlm, bm3d) applied after the first decoder, given "
                             "the true noise level: a ceiling for denoising after decoding.")
    up = commands.add_parser("upscale")
    up.add_argument("--images", required=True)
    up.add_argument("--crop", type=int, default=256)
    up.add_argument("--pipeline", required=True)
    principal = commands.add_parser("pca")
    principal.add_argument("--images", required=True)
    principal.add_argument("--crop", type=int, default=256)
    principal.add_argument("--vae", required=True)
    principal.add_argument("--sigmas", type=float, nargs="+", default=[0.03, 0.06, 0.12, 0.25])
    real = commands.add_parser("real-step")
    real.add_argument("--resolution", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    {"robustness": robustness, "upscale": upscale, "pca": pca, "real-step": real_step}[args.command](args)


if __name__ == "__main__":
    main()
