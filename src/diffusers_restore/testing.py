"""Tiny, random, offline SANA components for tests, smoke runs and benchmarks.

Nothing here touches the network: the tokenizer is built from an in-code vocabulary with the `tokenizers` library
(through transformers' tokenizers-backed `GemmaTokenizer`), and every model is built from a config with weights drawn
under a seed. Two scales are offered:

* tiny (``get_tiny_*``): a few thousand parameters each, for unit tests (milliseconds per forward on a CPU);
* real (``real_sana_transformer_config``, ``real_dc_ae_config``): the published SANA 1.6B / DC-AE f32c32 shapes, for
  benchmarks that measure real sizes with random weights.

``save_tiny_sana_pipeline(path)`` writes a complete *base* SANA pipeline folder in diffusers' ``SanaPipeline`` layout,
with a scheduler config that carries ``flow_shift`` like the real checkpoints, so that code written for
``Efficient-Large-Model/Sana_1600M_1024px_diffusers`` can be exercised offline.
"""

from __future__ import annotations

import inspect
import os
import string
from typing import Any

import torch

__all__ = [
    "TINY_CAPTION_CHANNELS",
    "TINY_LATENT_CHANNELS",
    "TINY_VAE_SCALE_FACTOR",
    "get_tiny_components",
    "get_tiny_text_encoder",
    "get_tiny_tokenizer",
    "get_tiny_transformer",
    "get_tiny_vae",
    "real_dc_ae_config",
    "real_sana_transformer_config",
    "save_tiny_sana_pipeline",
    "tiny_vocab",
]

TINY_LATENT_CHANNELS = 4
TINY_CAPTION_CHANNELS = 8
# The tiny AutoencoderDC has 3 blocks, so it downsamples 2 ** (3 - 1) = 4 times.
TINY_VAE_SCALE_FACTOR = 4
# Holds SANA's complex-human-instruction prefix (~1.06k byte-level tokens) plus a 300-token prompt.
TINY_MAX_POSITION_EMBEDDINGS = 2048


def tiny_vocab() -> dict[str, int]:
    """Gemma-ordered vocabulary: 5 special tokens, 256 byte-fallback tokens, the ``▁`` marker and printable ASCII.

    With byte fallback, any UTF-8 text tokenizes without ``<unk>`` (non-ASCII characters become byte tokens).
    """
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    tokens += [f"<0x{i:02X}>" for i in range(256)]
    tokens.append("\u2581")
    tokens += [c for c in string.printable if c not in " \t\n\r\x0b\x0c"]
    return {token: index for index, token in enumerate(tokens)}


def get_tiny_tokenizer():
    """A Gemma tokenizer (transformers' tokenizers-backed class) over :func:`tiny_vocab`.

    Behaves like the real Gemma-2 tokenizer where SANA relies on it: ``<bos>`` is prepended (``add_bos_token``), the
    pad token is ``<pad>`` (id 0), and padding, truncation and attention masks work. Round-trips exactly through
    ``save_pretrained``/``from_pretrained``.
    """
    from transformers import GemmaTokenizer

    return GemmaTokenizer(vocab=tiny_vocab(), merges=[], add_bos_token=True, add_eos_token=False)


def get_tiny_text_encoder(seed: int = 0, vocab_size: int | None = None):
    """A 1-layer ``Gemma2Model`` (hidden size 8) whose output feeds SANA's ``caption_projection``."""
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(
        vocab_size=vocab_size or len(tiny_vocab()),
        hidden_size=TINY_CAPTION_CHANNELS,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=4,
        max_position_embeddings=TINY_MAX_POSITION_EMBEDDINGS,
        sliding_window=TINY_MAX_POSITION_EMBEDDINGS,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = Gemma2Model(config)
    return model.eval()


def get_tiny_vae(seed: int = 0, **overrides: Any):
    """A 3-block ``AutoencoderDC`` (channels 8, 16, 16; latent 4; downsampling x4), random weights; `overrides`
    replace config entries (e.g. ``latent_channels=32``).

    ``scaling_factor`` is the real DC-AE f32c32 value (0.41407) so that latent scaling code paths are exercised.
    """
    from diffusers import AutoencoderDC

    config = dict(
        in_channels=3,
        latent_channels=TINY_LATENT_CHANNELS,
        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 16, 16),
        decoder_block_out_channels=(8, 16, 16),
        encoder_qkv_multiscales=((), (), (5,)),
        decoder_qkv_multiscales=((), (), (5,)),
        encoder_layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1),
        attention_head_dim=8,
        downsample_block_type="pixel_unshuffle",
        upsample_block_type="pixel_shuffle",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )
    config.update(overrides)
    torch.manual_seed(seed)
    return AutoencoderDC(**config).eval()


def get_tiny_transformer(seed: int = 0, **overrides: Any):
    """A 1-layer ``SanaTransformer2DModel`` (in/out 4 channels, 2 x 4 heads, caption channels 8, patch 1)."""
    from diffusers import SanaTransformer2DModel

    config = dict(
        in_channels=TINY_LATENT_CHANNELS,
        out_channels=TINY_LATENT_CHANNELS,
        num_attention_heads=2,
        attention_head_dim=4,
        num_layers=1,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=TINY_CAPTION_CHANNELS,
        mlp_ratio=2.5,
        sample_size=32,
        patch_size=1,
    )
    config.update(overrides)
    torch.manual_seed(seed)
    return SanaTransformer2DModel(**config).eval()


def real_sana_transformer_config() -> dict[str, Any]:
    """The SANA 1.6B transformer configuration (diffusers' default ``SanaTransformer2DModel()``) with SANA-1.5's
    ``qk_norm="rms_norm_across_heads"``: 20 layers, hidden 2240 (70 heads x 32), 32 latent channels, Gemma-2-2B
    caption channels 2304. Build it with random weights for size and speed measurements only."""
    from diffusers import SanaTransformer2DModel

    parameters = inspect.signature(SanaTransformer2DModel.__init__).parameters
    config = {name: p.default for name, p in parameters.items() if name != "self" and p.default is not p.empty}
    config["qk_norm"] = "rms_norm_across_heads"
    return config


def real_dc_ae_config() -> dict[str, Any]:
    """The DC-AE f32c32 configuration used by SANA (``mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers``): 32 latent
    channels, 32x spatial compression, scaling factor 0.41407."""
    return dict(
        in_channels=3,
        latent_channels=32,
        attention_head_dim=32,
        encoder_block_types=("ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
        decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
        encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
        decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
        encoder_layers_per_block=(2, 2, 2, 3, 3, 3),
        decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )


def get_tiny_components(seed: int = 0) -> dict[str, Any]:
    """The five components of a *base* ``SanaPipeline`` (tokenizer, text_encoder, vae, transformer, scheduler).

    The scheduler is the one real SANA checkpoints ship: ``DPMSolverMultistepScheduler`` with flow sigmas and
    ``flow_shift=3.0``. (diffusers drops ``flow_shift`` when such a config is turned into a flow-matching Euler
    scheduler with ``from_config``; ``RestorationGuidedFlowScheduler.from_config`` keeps it.)
    """
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(
        flow_shift=3.0,
        use_flow_sigmas=True,
        prediction_type="flow_prediction",
        algorithm_type="dpmsolver++",
        solver_order=2,
    )
    return {
        "tokenizer": get_tiny_tokenizer(),
        "text_encoder": get_tiny_text_encoder(seed),
        "vae": get_tiny_vae(seed),
        "transformer": get_tiny_transformer(seed),
        "scheduler": scheduler,
    }


def save_tiny_sana_pipeline(path: str | os.PathLike, seed: int = 0) -> str:
    """Write a complete base ``SanaPipeline`` folder (model_index.json, tokenizer/, text_encoder/, vae/, transformer/,
    scheduler/ with ``flow_shift`` 3.0) to ``path`` and return it as a string.

    The folder loads with ``diffusers.SanaPipeline.from_pretrained(path)`` and is accepted by
    ``examples/train_paired.py --pretrained_model_name_or_path`` and ``SanaRestorationPipeline.from_pretrained_sana``.
    """
    from diffusers import SanaPipeline

    pipe = SanaPipeline(**get_tiny_components(seed))
    pipe.save_pretrained(str(path), safe_serialization=True)
    return str(path)


def save_tiny_captioning_model(path: str | os.PathLike, seed: int = 0) -> str:
    """Write a tiny random LLaVA (a 1-layer CLIP vision tower and a 1-layer Llama over :func:`tiny_vocab` plus an
    ``<image>`` token) with its processor and a chat template to ``path``; it loads with transformers'
    ``AutoProcessor`` and ``AutoModelForImageTextToText`` and generates (meaningless) text offline. Used to test
    captioning, where no real vision-language model can be downloaded.
    """
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = get_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    chat_template = (
        "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}"
        "{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=chat_template,
    )
    processor.save_pretrained(str(path))
    model.save_pretrained(str(path))
    return str(path)
