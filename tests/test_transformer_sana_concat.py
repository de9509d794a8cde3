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


def test_bad_shapes_raise_clear_errors():
    model = ConcatConditionedTransformer.from_transformer(get_tiny_transformer(), condition_channels=3)
    inputs = _inputs()
    inputs["condition_latents"] = inputs["condition_latents"][:, :3]
    bad = dict(inputs, hidden_states=torch.randn(2, 5, 8, 8))
    with pytest.raises(ValueError, match=r"hidden_states.*\(batch, 4, height, width\)"):
        model(**bad)
    bad = dict(inputs, condition_latents=torch.randn(2, 4, 8, 8))
    with pytest.raises(ValueError, match=r"condition_latents.*\(batch, 3, height, width\)"):
        model(**bad)
    bad = dict(inputs, condition_latents=torch.randn(2, 3, 4, 8))
    with pytest.raises(ValueError, match="spatial size"):
        model(**bad)
    bad = dict(inputs, condition_latents=torch.randn(3, 3, 8, 8))
    with pytest.raises(ValueError, match="batch size 3"):
        model(**bad)
    with torch.no_grad():  # a batch of one condition broadcasts
        out = model(**dict(inputs, condition_latents=inputs["condition_latents"][:1])).sample
    assert out.shape == (2, 4, 8, 8)


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
    fresh.load_lora_adapter(tmp_path)  # the default prefix (None) reads the wrapper's own files
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


def test_real_size_adds_exactly_the_projection():
    config = real_sana_transformer_config()
    with init_empty_weights():
        sana = SanaTransformer2DModel(**config)
        model = ConcatConditionedTransformer(**config)
    extra = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in sana.parameters())
    assert extra == (32 + 32) * 32 == 2048
    assert sum(p.numel() for p in sana.parameters()) > 1.5e9


def test_invalid_condition_channels():
    with pytest.raises(ValueError, match="condition_channels"):
        ConcatConditionedTransformer(**{**get_tiny_transformer().config, "condition_channels": 0})
