import inspect
import os

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import SanaTransformer2DModel
from peft import LoraConfig

from diffusers_restore import ConcatConditionedTransformer
from diffusers_restore.testing import get_tiny_transformer, real_sana_transformer_config


def _inputs(batch=2, channels=4, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, channels, size, size, generator=g),
        condition_latents=torch.randn(batch, channels, size, size, generator=g),
        encoder_hidden_states=torch.randn(batch, 6, 8, generator=g),
        timestep=torch.tensor([900.0, 50.0][:batch]),
        encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]][:batch]),
    )


def _sana_out(sana, inputs):
    return sana(
        inputs["hidden_states"],
        encoder_hidden_states=inputs["encoder_hidden_states"],
        timestep=inputs["timestep"],
        encoder_attention_mask=inputs["encoder_attention_mask"],
    ).sample


@torch.no_grad()
def test_identity_at_init_for_any_condition():
    sana = get_tiny_transformer()
    model = ConcatConditionedTransformer.from_transformer(sana)
    inputs = _inputs()
    expected = _sana_out(sana, inputs)
    for scale in (0.0, 1.0, 1e4):
        inputs["condition_latents"] = torch.randn_like(inputs["condition_latents"]) * scale
        assert torch.equal(model(**inputs).sample, expected)


def test_from_transformer_shares_weights_and_config():
    sana = get_tiny_transformer()
    model = ConcatConditionedTransformer.from_transformer(sana, condition_channels=6)
    assert model.transformer is sana
    assert model.transformer.patch_embed.proj.weight.data_ptr() == sana.patch_embed.proj.weight.data_ptr()
    for key, value in sana.config.items():
        if not key.startswith("_"):
            assert model.config[key] == value, key
    assert model.config.condition_channels == 6
    assert tuple(model.projection.weight.shape) == (4, 10, 1, 1)
    with pytest.raises(ValueError, match="SanaTransformer2DModel"):
        ConcatConditionedTransformer.from_transformer(torch.nn.Linear(2, 2))


def test_constructor_builds_the_same_sana_as_from_transformer():
    sana = get_tiny_transformer()
    model = ConcatConditionedTransformer.from_transformer(sana)
    rebuilt = ConcatConditionedTransformer.from_config(model.config)
    assert set(rebuilt.state_dict()) == set(model.state_dict())
    assert torch.equal(rebuilt.projection.weight, model.projection.weight)


@torch.no_grad()
def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = ConcatConditionedTransformer.from_transformer(get_tiny_transformer(), condition_channels=4)
    model.projection.weight.normal_()  # a trained-looking projection
    inputs = _inputs()
    expected = model(**inputs).sample
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded = ConcatConditionedTransformer.from_pretrained(tmp_path)
    assert torch.equal(loaded(**inputs).sample, expected)
    assert loaded.config.condition_channels == 4 and loaded.config.in_channels == 4


@torch.no_grad()
def test_plain_sana_folder_loads_as_identity_wrapper(tmp_path):
    sana = get_tiny_transformer()
    sana.save_pretrained(tmp_path / "transformer")
    inputs = _inputs()
    for model in (
        ConcatConditionedTransformer.from_sana_pretrained(tmp_path, subfolder="transformer"),
        ConcatConditionedTransformer.from_pretrained(tmp_path, subfolder="transformer"),
    ):
        assert isinstance(model, ConcatConditionedTransformer)
        assert torch.equal(model(**inputs).sample, _sana_out(sana, inputs))


def test_torch_dtype_loading(tmp_path):
    ConcatConditionedTransformer.from_transformer(get_tiny_transformer()).save_pretrained(tmp_path)
    model = ConcatConditionedTransformer.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert model.projection.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.transformer.parameters())
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in _inputs().items()}
    with torch.no_grad():
        out = model(**inputs).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_wrong_channels_raise_a_clear_error_and_one_condition_broadcasts():
    model = ConcatConditionedTransformer.from_transformer(get_tiny_transformer(), condition_channels=3)
    inputs = _inputs()
    inputs["condition_latents"] = inputs["condition_latents"][:, :3]
    for bad in (dict(hidden_states=torch.randn(2, 5, 8, 8)), dict(condition_latents=torch.randn(2, 4, 8, 8))):
        with pytest.raises(ValueError, match="must have 4 and 3 channels"):
            model(**dict(inputs, **bad))
    one = inputs["condition_latents"][:1]
    with torch.no_grad():
        out = model(**dict(inputs, condition_latents=one)).sample
        expected = model(**dict(inputs, condition_latents=one.expand(2, -1, -1, -1))).sample
    assert torch.equal(out, expected)


@torch.no_grad()
def test_attention_processors_are_sanas_and_qkv_fusion_keeps_the_output():
    """diffusers' `AttentionMixin`: the wrapper lists, sets and fuses the attention of the SANA it wraps."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    model = ConcatConditionedTransformer.from_transformer(get_tiny_transformer())
    sana_processors = model.transformer.attn_processors
    assert model.attn_processors == {f"transformer.{name}": value for name, value in sana_processors.items()}
    inputs = _inputs()
    expected = model(**inputs).sample
    model.fuse_qkv_projections()
    torch.testing.assert_close(model(**inputs).sample, expected, atol=1e-5, rtol=0)
    model.unfuse_qkv_projections()
    model.set_attn_processor(AttnProcessor2_0())
    assert all(isinstance(value, AttnProcessor2_0) for value in model.transformer.attn_processors.values())


def test_condition_half_of_projection_learns():
    model = ConcatConditionedTransformer.from_transformer(get_tiny_transformer())
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    inputs = _inputs()
    loss = (model(**inputs).sample - torch.randn(2, 4, 8, 8)).pow(2).mean()
    loss.backward()
    grad = model.projection.weight.grad
    assert grad is not None and grad[:, 4:].abs().sum() > 0
    optimizer.step()
    assert model.projection.weight[:, 4:].abs().sum() > 0  # no longer zero: the condition now reaches SANA


def test_gradient_checkpointing_matches_plain_backward():
    model = ConcatConditionedTransformer.from_transformer(get_tiny_transformer(num_layers=2))
    model.train()
    inputs = _inputs()

    def grads():
        model.zero_grad()
        model(**inputs).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.enable_gradient_checkpointing()
    assert model.transformer.gradient_checkpointing
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)


def test_lora_add_save_load(tmp_path):
    torch.manual_seed(0)
    model = ConcatConditionedTransformer.from_transformer(get_tiny_transformer())
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "projection.weight" in trainable
    assert trainable - {"projection.weight"} and all("lora" in n for n in trainable - {"projection.weight"})
    with torch.no_grad():
        model.projection.weight.normal_()
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # make the adapter matter
    inputs = _inputs()
    with torch.no_grad():
        expected = model(**inputs).sample
    model.save_lora_adapter(tmp_path)
    assert {"pytorch_lora_weights.safetensors", "condition_projection.safetensors"} <= set(os.listdir(tmp_path))

    fresh = ConcatConditionedTransformer.from_transformer(get_tiny_transformer())
    with torch.no_grad():
        assert not torch.allclose(fresh(**inputs).sample, expected)
    fresh.load_lora_adapter(tmp_path)  # the default prefix ("transformer", as diffusers') reads the wrapper's own files
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).sample, expected, rtol=1e-5, atol=1e-6)

    # A pipeline-style state dict carries the component name in front: prefix="transformer" strips it.
    from safetensors.torch import load_file

    prefixed = {f"transformer.{k}": v for k, v in load_file(tmp_path / "pytorch_lora_weights.safetensors").items()}
    other = ConcatConditionedTransformer.from_transformer(get_tiny_transformer())
    with torch.no_grad():
        other.projection.weight.copy_(model.projection.weight)
    other.load_lora_adapter(prefixed, prefix="transformer")
    with torch.no_grad():
        torch.testing.assert_close(other(**inputs).sample, expected, rtol=1e-5, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("patch_size", [1, 2])
def test_fuse_projection_is_equivalent(patch_size, tmp_path):
    model = ConcatConditionedTransformer.from_transformer(get_tiny_transformer(patch_size=patch_size))
    model.projection.weight.normal_()
    inputs = _inputs()
    expected = model(**inputs).sample
    model.fuse_projection()
    assert model.is_projection_fused
    torch.testing.assert_close(model(**inputs).sample, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unfuse_projection"):
        model.save_pretrained(tmp_path)
    model.unfuse_projection()
    assert torch.equal(model(**inputs).sample, expected)


@torch.no_grad()
def test_fuse_projection_folds_a_lora_on_the_projection(tmp_path):
    model = ConcatConditionedTransformer.from_transformer(get_tiny_transformer())
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q"]))
    model.projection.weight.normal_()
    model.save_lora_adapter(tmp_path)  # the trained projection goes to the sidecar
    loaded = ConcatConditionedTransformer.from_transformer(get_tiny_transformer())
    loaded.load_lora_adapter(tmp_path)
    inputs = _inputs()
    expected = loaded(**inputs).sample
    torch.testing.assert_close(expected, model(**inputs).sample, rtol=1e-5, atol=1e-5)
    loaded.fuse_projection()
    torch.testing.assert_close(loaded(**inputs).sample, expected, rtol=1e-5, atol=1e-5)


def test_real_size_adds_exactly_the_projection():
    config = real_sana_transformer_config()
    with init_empty_weights():
        sana = SanaTransformer2DModel(**config)
        model = ConcatConditionedTransformer(**config)
    extra = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in sana.parameters())
    assert extra == (32 + 32) * 32 == 2048
    assert sum(p.numel() for p in sana.parameters()) > 1.5e9


# ---------------------------------------------------------------------------------------------- diffusers behaviour


def test_save_pretrained_spells_out_diffusers_arguments():
    """diffusers' pipeline `save_pretrained` passes `variant` / `max_shard_size` only to methods that name them."""
    parameters = inspect.signature(ConcatConditionedTransformer.save_pretrained).parameters
    assert {"safe_serialization", "variant", "max_shard_size", "push_to_hub", "is_main_process"} <= set(parameters)


@torch.no_grad()
def test_variant_and_shards_round_trip(tmp_path):
    model = ConcatConditionedTransformer.from_transformer(get_tiny_transformer(num_layers=2))
    model.projection.weight.normal_()
    expected = model(**_inputs()).sample
    model.save_pretrained(tmp_path / "fp16", variant="fp16")
    assert "diffusion_pytorch_model.fp16.safetensors" in os.listdir(tmp_path / "fp16")
    loaded = ConcatConditionedTransformer.from_pretrained(tmp_path / "fp16", variant="fp16")
    assert torch.equal(loaded(**_inputs()).sample, expected)

    model.save_pretrained(tmp_path / "shards", max_shard_size="20KB")
    files = os.listdir(tmp_path / "shards")
    assert "diffusion_pytorch_model.safetensors.index.json" in files
    assert len([f for f in files if f.endswith(".safetensors")]) > 1
    loaded = ConcatConditionedTransformer.from_pretrained(tmp_path / "shards")
    assert torch.equal(loaded(**_inputs()).sample, expected)


def _tiny_pipeline():
    from diffusers import SanaPipeline

    from diffusers_restore import SanaRestorationPipeline
    from diffusers_restore.testing import get_tiny_components

    pipe = SanaRestorationPipeline.from_sana_pipeline(SanaPipeline(**get_tiny_components()))
    with torch.no_grad():
        pipe.transformer.projection.weight.normal_()
    return pipe


@torch.no_grad()
def test_pipeline_variant_reaches_the_transformer(tmp_path):
    from diffusers_restore import SanaRestorationPipeline

    pipe = _tiny_pipeline()
    expected = pipe.transformer(**_inputs()).sample
    pipe.save_pretrained(tmp_path, variant="fp16")
    assert set(os.listdir(tmp_path / "transformer")) == {"config.json", "diffusion_pytorch_model.fp16.safetensors"}
    loaded = SanaRestorationPipeline.from_pretrained(tmp_path, variant="fp16")
    assert torch.equal(loaded.transformer(**_inputs()).sample, expected)

    pipe.save_pretrained(tmp_path / "sharded", max_shard_size="4KB")
    assert "diffusion_pytorch_model.safetensors.index.json" in os.listdir(tmp_path / "sharded" / "transformer")


@torch.no_grad()
def test_push_to_hub_with_variant(tmp_path, hub):
    from huggingface_hub import list_repo_files

    from diffusers_restore import SanaRestorationPipeline

    pipe = _tiny_pipeline()
    expected = pipe.transformer(**_inputs()).sample
    pipe.push_to_hub("org/restorer", token="hf_test", variant="fp16")
    assert "transformer/diffusion_pytorch_model.fp16.safetensors" in list_repo_files("org/restorer")
    loaded = SanaRestorationPipeline.from_pretrained("org/restorer", variant="fp16", cache_dir=tmp_path / "cache")
    assert torch.equal(loaded.transformer(**_inputs()).sample, expected)

    pipe.transformer.push_to_hub("org/transformer", token="hf_test", variant="fp16")
    assert "diffusion_pytorch_model.fp16.safetensors" in list_repo_files("org/transformer")


def test_weights_save_as_asked_and_load_as_diffusers_loads_them(tmp_path):
    """`safe_serialization=False` writes a pickle, read back through torch's weights-only loader; safetensors win when
    both exist, and `use_safetensors=True` refuses a pickle. (A code-carrying pickle: see the pipeline's tests.)"""
    model = ConcatConditionedTransformer.from_transformer(get_tiny_transformer())
    with torch.no_grad():
        model.projection.weight.normal_()
    model.save_pretrained(tmp_path / "pickle", safe_serialization=False)
    assert sorted(os.listdir(tmp_path / "pickle")) == ["config.json", "diffusion_pytorch_model.bin"]
    loaded = ConcatConditionedTransformer.from_pretrained(tmp_path / "pickle")
    assert all(torch.equal(value, loaded.state_dict()[key]) for key, value in model.state_dict().items())
    with pytest.raises(OSError, match="diffusion_pytorch_model.safetensors"):
        ConcatConditionedTransformer.from_pretrained(tmp_path / "pickle", use_safetensors=True)

    # a plain SANA transformer saved as a pickle is wrapped as from a safetensors folder
    sana = get_tiny_transformer()
    sana.save_pretrained(tmp_path / "sana", safe_serialization=False)
    wrapped = ConcatConditionedTransformer.from_pretrained(tmp_path / "sana")
    assert all(torch.equal(value, wrapped.transformer.state_dict()[key]) for key, value in sana.state_dict().items())


# ---------------------------------------------------------------------------------------------- every SANA base

# The transformer configurations of the released SANA checkpoints (diffusers' conversion script); the rest are
# SanaTransformer2DModel's defaults (32 latent channels, Gemma-2 caption channels 2304, mlp_ratio 2.5, patch 1).
_WIDE = dict(num_attention_heads=70, attention_head_dim=32, num_cross_attention_heads=20, cross_attention_head_dim=112,
             cross_attention_dim=2240)
_600M = dict(num_attention_heads=36, attention_head_dim=32, num_cross_attention_heads=16, cross_attention_head_dim=72,
             cross_attention_dim=1152, num_layers=28)
SANA_BASES = {
    "sana-1.0-1.6B": dict(_WIDE, num_layers=20),
    "sana-1.5-1.6B": dict(_WIDE, num_layers=20, qk_norm="rms_norm_across_heads"),
    "sana-1.0-600M": dict(_600M),
    "sana-1.5-4.8B": dict(_WIDE, num_layers=60, qk_norm="rms_norm_across_heads"),
    "sana-sprint-1.6B": dict(_WIDE, num_layers=20, qk_norm="rms_norm_across_heads", guidance_embeds=True),
    "sana-sprint-600M": dict(_600M, qk_norm="rms_norm_across_heads", guidance_embeds=True),
}


@pytest.mark.parametrize("name", list(SANA_BASES))
def test_every_released_sana_base_wraps_with_2048_new_parameters(name):
    with init_empty_weights():
        sana = SanaTransformer2DModel(**SANA_BASES[name])
    model = ConcatConditionedTransformer.from_transformer(sana)
    assert model.transformer is sana
    extra = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in sana.parameters())
    assert extra == (32 + 32) * 32 == 2048
    for key, value in sana.config.items():
        if not key.startswith("_"):
            assert model.config[key] == value, key


def _sana_reference(sana, inputs, **extra):
    return sana(
        inputs["hidden_states"],
        encoder_hidden_states=inputs["encoder_hidden_states"],
        timestep=inputs["timestep"],
        encoder_attention_mask=inputs["encoder_attention_mask"],
        **extra,
    ).sample


@torch.no_grad()
@pytest.mark.parametrize(
    "overrides",
    [dict(qk_norm="rms_norm_across_heads"), dict(qk_norm="rms_norm_across_heads", guidance_embeds=True)],
    ids=["sana-1.5", "sana-sprint"],
)
def test_forward_passes_every_sana_argument(overrides):
    """Identity at init on SANA 1.5 and Sprint bases, with SANA's `guidance`, `attention_mask` and
    `controlnet_block_samples` reaching the wrapped model."""
    sana = get_tiny_transformer(num_layers=3, **overrides)
    model = ConcatConditionedTransformer.from_transformer(sana)
    inputs = _inputs()
    extra = dict(
        attention_mask=torch.tensor([[1] * 64, [1] * 40 + [0] * 24]),
        controlnet_block_samples=tuple(torch.randn(2, 64, 8) for _ in range(2)),
    )
    if overrides.get("guidance_embeds"):
        extra["guidance"] = torch.tensor([4.5, 1.0])
    expected = _sana_reference(sana, inputs, **extra)
    assert torch.equal(model(**inputs, **extra).sample, expected)
    # guidance and the ControlNet residuals change the result, so they reach SANA (its linear self-attention
    # ignores `attention_mask`, which is only checked to pass through like the rest)
    for key in ("guidance", "controlnet_block_samples") if "guidance" in extra else ("controlnet_block_samples",):
        reduced = {k: v for k, v in extra.items() if k != key}
        if key == "guidance":
            reduced["guidance"] = torch.tensor([0.0, 9.0])
        assert not torch.allclose(model(**inputs, **reduced).sample, expected), key


def _residual_model(seed=0):
    sana = get_tiny_transformer(seed)
    config = {key: value for key, value in sana.config.items() if not key.startswith("_")}
    return ConcatConditionedTransformer(**config, condition_residual=True)


@torch.no_grad()
def test_condition_residual_model_returns_the_condition_until_trained_and_reads_its_output_as_z_cond_minus_x0():
    model = _residual_model()
    inputs = _inputs()
    sigma = (inputs["timestep"] / 1000.0).view(-1, 1, 1, 1)
    x0 = inputs["hidden_states"] - sigma * model(**inputs).sample  # one Euler step to sigma = 0
    torch.testing.assert_close(x0, inputs["condition_latents"], rtol=0, atol=1e-5)
    torch.nn.init.normal_(model.transformer.proj_out.weight, std=0.1)
    projected = model.projection(torch.cat([inputs["hidden_states"], inputs["condition_latents"]], dim=1))
    residual = _sana_out(model.transformer, dict(inputs, hidden_states=projected))
    x0 = inputs["hidden_states"] - sigma * model(**inputs).sample
    torch.testing.assert_close(x0, inputs["condition_latents"] - residual, rtol=0, atol=1e-4)


def test_condition_residual_round_trips_and_refuses_mismatched_channels(tmp_path):
    model = _residual_model()
    model.save_pretrained(tmp_path / "residual")
    loaded = ConcatConditionedTransformer.from_pretrained(tmp_path / "residual")
    assert loaded.config.condition_residual is True
    inputs = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, model(**inputs).sample)
    config = {key: value for key, value in get_tiny_transformer().config.items() if not key.startswith("_")}
    with pytest.raises(ValueError, match="condition_residual"):
        ConcatConditionedTransformer(**config, condition_channels=3, condition_residual=True)


def test_enable_condition_residual_keeps_the_weights_and_starts_from_the_condition(tmp_path):
    """A trained model made condition-anchored keeps its projection and SANA's blocks, returns the condition at one
    step, and saves the flag (it loads back the same)."""
    model = ConcatConditionedTransformer.from_transformer(get_tiny_transformer(0))
    with torch.no_grad():
        model.projection.weight.normal_(std=0.1)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    model.enable_condition_residual()
    assert model.config.condition_residual is True
    for key, value in model.state_dict().items():
        if key.startswith("transformer.proj_out"):
            assert not value.any(), key
        else:
            assert torch.equal(value, before[key]), key
    inputs = dict(_inputs(), timestep=torch.full((2,), 1000.0))  # sigma = 1
    with torch.no_grad():
        x0 = inputs["hidden_states"] - model(**inputs).sample
        torch.testing.assert_close(x0, inputs["condition_latents"], rtol=0, atol=1e-5)
        model.save_pretrained(tmp_path / "anchored")
        loaded = ConcatConditionedTransformer.from_pretrained(tmp_path / "anchored")
        assert loaded.config.condition_residual is True
        assert torch.equal(loaded(**inputs).sample, model(**inputs).sample)
    with pytest.raises(ValueError, match="condition_residual"):
        ConcatConditionedTransformer.from_transformer(get_tiny_transformer(0), condition_channels=3
                                                      ).enable_condition_residual()


@torch.no_grad()
def test_an_untrained_condition_residual_pipeline_with_fidelity_returns_its_input():
    """One step from sigma = 1 gives x0 = the condition's latent, and `fidelity=1` adds back what the VAE loses of the
    (cleaned) input: the whole pipeline is the identity until its transformer is trained."""
    pipe = _tiny_pipeline()
    config = {key: value for key, value in pipe.transformer.config.items() if not key.startswith("_")}
    residual = ConcatConditionedTransformer(**{**config, "condition_residual": True})
    residual.load_state_dict({k: v for k, v in pipe.transformer.state_dict().items()
                              if not k.startswith("transformer.proj_out")}, strict=False)
    pipe.register_modules(transformer=residual)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = pipe(image, num_inference_steps=1, guidance_scale=1.0, fidelity=1.0, output_type="pt").images
    torch.testing.assert_close(out, image, rtol=0, atol=1e-4)
