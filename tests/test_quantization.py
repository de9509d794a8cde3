"""Quantized loading (`diffusers_restore.quantization`): torchao int8 runs here, bitsandbytes nf4 through diffusers
needs a GPU (its text-encoder half runs on CPU through transformers). Quantized pipelines save and load back: int8
and the nf4 text encoder here, the nf4 transformer where a GPU runs it."""

import importlib.metadata

import numpy as np
import pytest
import torch

from diffusers_restore import SanaRestorationPipeline
from diffusers_restore.cli import main as cli_main
from diffusers_restore.cli_common import BUNDLED_MODEL_DIR
from diffusers_restore.quantization import (
    TRANSFORMER_MODULES_TO_NOT_CONVERT,
    pipeline_quantization_config,
    quantization_unavailable,
    text_encoder_quantization_config,
    transformer_quantization_config,
    weight_bytes,
)

NO_GPU = "diffusers' bitsandbytes quantizer refuses a machine without a GPU ('No GPU found')"


def _image(size: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] / size
    image = np.stack([0.5 + 0.4 * np.sin(6 * x + 4 * y + phase) for phase in (0.0, 2.0, 4.0)], axis=-1)
    return (image * 255).astype(np.uint8)


def _restore(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(_image(), prompt="a photo", generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / max(np.mean((a.astype(np.float64) - b) ** 2), 1e-12)))


@pytest.fixture(scope="module")
def reference():
    """The bundled restorer's bf16 output (unquantized)."""
    return _restore(SanaRestorationPipeline.from_pretrained(BUNDLED_MODEL_DIR, dtype=torch.bfloat16))


def _is_quantized(weight) -> bool:
    return type(weight) is not torch.nn.Parameter


def test_int8_loads_quantized_keeps_the_skipped_modules_and_restores_close(reference, tmp_path):
    pytest.importorskip("torchao")
    config = pipeline_quantization_config("int8")
    pipe = SanaRestorationPipeline.from_pretrained(BUNDLED_MODEL_DIR, dtype=torch.bfloat16, quantization_config=config)
    sana = pipe.transformer.transformer
    assert _is_quantized(sana.transformer_blocks[0].attn1.to_q.weight)
    assert _is_quantized(pipe.text_encoder.layers[0].mlp.gate_proj.weight)
    kept = [pipe.transformer.projection, sana.caption_projection.linear_1, sana.time_embed.linear, sana.proj_out]
    assert not any(_is_quantized(module.weight) for module in kept)
    assert {"projection", "proj_out"} <= set(TRANSFORMER_MODULES_TO_NOT_CONVERT)
    assert weight_bytes(pipe.transformer) < 0.85 * weight_bytes(
        SanaRestorationPipeline.from_pretrained(BUNDLED_MODEL_DIR, dtype=torch.bfloat16).transformer
    )

    restored = _restore(pipe)
    assert np.isfinite(restored).all()
    assert _psnr(restored, reference) > 40  # 54.9 dB measured

    pipe.save_pretrained(tmp_path)  # torchao tensors saved flattened in safetensors, with the config
    reloaded = SanaRestorationPipeline.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert _is_quantized(reloaded.transformer.transformer.transformer_blocks[0].attn1.to_q.weight)
    assert np.array_equal(_restore(reloaded), restored)


def test_nf4_text_encoder_runs_on_cpu_through_transformers_and_saves(reference, tmp_path):
    pytest.importorskip("bitsandbytes")
    config = pipeline_quantization_config("nf4", components=["text_encoder"])
    pipe = SanaRestorationPipeline.from_pretrained(BUNDLED_MODEL_DIR, dtype=torch.bfloat16, quantization_config=config)
    assert type(pipe.text_encoder.layers[0].mlp.gate_proj).__name__ == "Linear4bit"
    assert not _is_quantized(pipe.transformer.transformer.transformer_blocks[0].attn1.to_q.weight)
    restored = _restore(pipe)
    assert np.isfinite(restored).all()
    assert _psnr(restored, reference) > 40  # 54.8 dB measured

    pipe.save_pretrained(tmp_path)  # packed 4-bit weights and their quantization state
    reloaded = SanaRestorationPipeline.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert type(reloaded.text_encoder.layers[0].mlp.gate_proj).__name__ == "Linear4bit"
    assert np.array_equal(_restore(reloaded), restored)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
def test_nf4_pipeline_on_gpu_restores_close_and_saves(reference, tmp_path):
    pytest.importorskip("bitsandbytes")
    pipe = SanaRestorationPipeline.from_pretrained(
        BUNDLED_MODEL_DIR, dtype=torch.bfloat16, quantization_config=pipeline_quantization_config("nf4")
    ).to("cuda")
    sana = pipe.transformer.transformer
    assert type(sana.transformer_blocks[0].attn1.to_q).__name__ == "Linear4bit"
    assert type(sana.proj_out).__name__ == "Linear" and not _is_quantized(pipe.transformer.projection.weight)
    restored = _restore(pipe)
    assert np.isfinite(restored).all()
    assert _psnr(restored, reference) > 30  # 47.5 dB measured on CPU bitsandbytes layers

    pipe.save_pretrained(tmp_path)
    reloaded = SanaRestorationPipeline.from_pretrained(tmp_path, dtype=torch.bfloat16).to("cuda")
    assert type(reloaded.transformer.transformer.transformer_blocks[0].attn1.to_q).__name__ == "Linear4bit"
    assert np.array_equal(_restore(reloaded), restored)


def test_nf4_transformer_is_refused_on_cpu_by_diffusers():
    pytest.importorskip("bitsandbytes")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from diffusers_restore import ConcatConditionedTransformer

    with pytest.raises(RuntimeError, match="No GPU found"):
        ConcatConditionedTransformer.from_pretrained(
            BUNDLED_MODEL_DIR, subfolder="transformer", quantization_config=transformer_quantization_config("nf4")
        )
    assert quantization_unavailable("nf4", "cpu") == (
        "nf4 needs a GPU: diffusers' bitsandbytes quantizer does not run on the CPU (int8 does)"
    )


def test_a_missing_backend_is_one_clear_line(monkeypatch, tmp_path, capsys):
    real_version = importlib.metadata.version

    def version(name):
        if name in ("torchao", "bitsandbytes"):
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert quantization_unavailable("int8") == "int8 needs torchao >= 0.16.0 (it is not installed): pip install -U torchao"
    with pytest.raises(ImportError, match="bitsandbytes"):
        text_encoder_quantization_config("nf4")
    with pytest.raises(ValueError, match="int4"):
        pipeline_quantization_config("int4")
    assert pipeline_quantization_config("none") is None

    (tmp_path / "in.png").write_bytes(b"")
    status = cli_main(["restore", "--model", "bundled", "--quantize", "int8", "-o", str(tmp_path / "out"),
                       str(tmp_path / "in.png")])
    err = capsys.readouterr().err
    assert status == 2
    assert err == ("sana-restore restore: error: --quantize int8 needs torchao >= 0.16.0 (it is not installed): "
                   "pip install -U torchao.\n")


def test_weight_bytes_counts_quantized_storage():
    layer = torch.nn.Linear(256, 512, bias=False).to(torch.bfloat16)
    assert weight_bytes(layer) == 256 * 512 * 2
    tied = torch.nn.Sequential(layer, torch.nn.Linear(256, 512, bias=False))
    tied[1].weight = layer.weight
    assert weight_bytes(tied) == 256 * 512 * 2

    bnb = pytest.importorskip("bitsandbytes")
    packed = bnb.nn.Linear4bit(256, 512, bias=False, quant_type="nf4", compress_statistics=False)
    packed.weight = bnb.nn.Params4bit(layer.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                      compress_statistics=False).to("cpu")
    # 4 bits per weight + one float32 scale per block of 64 + the 16-entry code book
    assert weight_bytes(packed) == 256 * 512 // 2 + 256 * 512 // 64 * 4 + 16 * 4


def test_importing_with_torchao_installed_prints_nothing():
    """diffusers imports torchao whenever it is installed; its import-time notices about things this package does not
    use must not reach the user (torchao's own warning that it was not built for this torch, if any, still does)."""
    import subprocess
    import sys

    pytest.importorskip("torchao")
    code = ("from diffusers_restore import SanaRestorationPipeline\n"
            "from diffusers_restore.quantization import pipeline_quantization_config\n"
            "pipeline_quantization_config('int8')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "incompatible torch version" not in line]
    assert lines == []


def test_cli_restores_with_int8_and_refuses_nf4_on_cpu(tmp_path, capsys):
    from PIL import Image

    Image.fromarray(_image()).save(tmp_path / "in.png")
    if not torch.cuda.is_available():
        status = cli_main(["restore", "--model", "bundled", "--quantize", "nf4", "--device", "cpu",
                           "-o", str(tmp_path / "nf4"), str(tmp_path / "in.png")])
        assert status == 2
        assert capsys.readouterr().err == (
            "sana-restore restore: error: --quantize nf4 needs a GPU: diffusers' bitsandbytes quantizer does not run "
            "on the CPU (int8 does).\n"
        )
        assert not (tmp_path / "nf4").exists()
    pytest.importorskip("torchao")
    assert cli_main(["restore", "--model", "bundled", "--quantize", "int8", "--device", "cpu",
                     "-o", str(tmp_path / "int8"), str(tmp_path / "in.png")]) == 0
    assert Image.open(tmp_path / "int8" / "in.png").size == (64, 64)


@pytest.mark.skipif(torch.cuda.is_available(), reason="nf4 runs on this machine's GPU")
def test_app_refuses_nf4_on_cpu_before_serving(capsys):
    pytest.importorskip("gradio")
    assert cli_main(["app", "--quantize", "nf4", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith("sana-restore app: error: --quantize nf4 needs a GPU")
