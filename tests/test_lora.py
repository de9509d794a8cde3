"""LoRA through the pipeline: both file formats, the condition projection that travels with them, and how adapters
combine, fuse and unload.

References are built independently of the loading code: a model that holds the adapters it was trained with
(`add_adapter` + weights set in place) and whose projection is set by hand to the formula of the transformer's LoRA
section, `P = P_0 + sum_a s * w_a * (P_a - P_0)`.
"""

import os

import numpy as np
import pytest
import torch
from diffusers import SanaPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from diffusers_restore import ConcatConditionedTransformer, SanaRestorationPipeline
from diffusers_restore.testing import get_tiny_components, get_tiny_transformer

TARGETS = ["to_q", "to_k", "to_v"]


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(2, 4, 8, 8, generator=g),
        condition_latents=torch.randn(2, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(2, 6, 8, generator=g),
        timestep=torch.tensor([900.0, 50.0]),
        encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]),
    )


@torch.no_grad()
def _out(model, **kwargs):
    return model(**_inputs(), **kwargs).sample


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def _pipe(seed=0):
    pipe = SanaRestorationPipeline.from_sana_pipeline(SanaPipeline(**get_tiny_components(seed)))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _base_projection(seed=100):
    """A trained-looking (non-identity) projection for the model the LoRAs are loaded into: P_0."""
    return torch.randn(4, 8, 1, 1, generator=torch.Generator().manual_seed(seed)) * 0.5


def _trained(seed, base=None, adapter_name="default"):
    """A wrapper after a LoRA run: a non-zero adapter and a projection trained away from the base."""
    model = ConcatConditionedTransformer.from_transformer(get_tiny_transformer())
    if base is not None:
        with torch.no_grad():
            model.projection.weight.copy_(base)
    _add_trained_adapter(model, seed, adapter_name)
    with torch.no_grad():
        model.projection.weight.add_(torch.randn(4, 8, 1, 1, generator=torch.Generator().manual_seed(seed + 50)))
    return model


def _add_trained_adapter(model, seed, adapter_name):
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS), adapter_name=adapter_name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name and f".{adapter_name}." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


def _lora_layers(model, adapter_name):
    """The adapter's LoRA weights, as peft holds them (for building references)."""
    return {k: v.clone() for k, v in get_peft_model_state_dict(model, adapter_name=adapter_name).items()}


def _reference(base, adapters, weights):
    """A model with the given trained adapters added in place, `set_adapters(names, weights)`, and its projection
    set to `P_0 + sum w_a (P_a - P_0)`. `adapters`: {name: (lora state dict, P_a)}."""
    from peft import set_peft_model_state_dict

    model = ConcatConditionedTransformer.from_transformer(get_tiny_transformer())
    projection = base.clone()
    for (name, (layers, trained_projection)), weight in zip(adapters.items(), weights):
        model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS), adapter_name=name)
        set_peft_model_state_dict(model, layers, adapter_name=name)
        projection += weight * (trained_projection - base)
    model.set_adapters(list(adapters), weights)
    with torch.no_grad():
        model.projection.weight.copy_(projection)
    return model


def test_training_output_folder_loads_through_the_pipeline(tmp_path):
    """`examples/train_paired.py --use_lora` saves `<output_dir>/transformer_lora` with `save_lora_adapter`."""
    trained = _trained(seed=1)
    expected = _out(trained)
    trained.save_lora_adapter(tmp_path / "transformer_lora")
    assert {"pytorch_lora_weights.safetensors", "condition_projection.safetensors"} <= set(
        os.listdir(tmp_path / "transformer_lora")
    )

    pipe = _pipe()
    before = _out(pipe.transformer)
    pipe.load_lora_weights(tmp_path / "transformer_lora")  # failed with peft's KeyError: 'model_type'
    assert torch.equal(pipe.transformer.projection.weight, trained.projection.weight)
    _close(_out(pipe.transformer), expected)
    assert (before - expected).abs().max() > 1e-2

    # end to end: the loaded projection makes the pipeline look at the degraded image
    image = (np.random.default_rng(0).random((24, 24, 3)) * 255).astype(np.uint8)
    run = dict(num_inference_steps=2, guidance_scale=1.0, output_type="np")
    first = pipe(image, generator=torch.Generator().manual_seed(0), **run).images
    second = pipe(255 - image, generator=torch.Generator().manual_seed(0), **run).images
    assert np.abs(first - second).max() > 1e-3


def test_pipeline_file_carries_the_projection(tmp_path, caplog):
    trained = _trained(seed=2)
    expected = _out(trained)
    SanaRestorationPipeline.save_lora_weights(
        tmp_path,
        transformer_lora_layers=get_peft_model_state_dict(trained),
        condition_projection=trained.projection,
    )
    keys = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    assert torch.equal(keys["transformer.projection.weight"], trained.projection.weight)
    assert all(k.startswith("transformer.transformer.") for k in keys if k != "transformer.projection.weight")

    pipe = _pipe()
    pipe.load_lora_weights(tmp_path)
    _close(_out(pipe.transformer), expected)

    # without the projection: a warning, and the loading pipeline keeps its own
    with caplog.at_level("WARNING"):
        SanaRestorationPipeline.save_lora_weights(tmp_path / "bare", transformer_lora_layers=get_peft_model_state_dict(trained))
    assert "condition_projection" in caplog.text
    other = _pipe()
    projection = other.transformer.projection.weight.clone()
    other.load_lora_weights(tmp_path / "bare")
    assert torch.equal(other.transformer.projection.weight, projection)


def test_unload_restores_the_projection_before_loading(tmp_path):
    base = _base_projection()
    pipe = _pipe()
    with torch.no_grad():
        pipe.transformer.projection.weight.copy_(base)
    before = _out(pipe.transformer)
    trained = _trained(seed=3, base=base)
    trained.save_lora_adapter(tmp_path)

    pipe.load_lora_weights(tmp_path)
    _close(_out(pipe.transformer), _out(trained))
    pipe.unload_lora_weights()
    assert torch.equal(pipe.transformer.projection.weight, base)
    assert not any("lora" in name for name, _ in pipe.transformer.named_parameters())
    _close(_out(pipe.transformer), before)


def test_fuse_and_unfuse(tmp_path):
    base = _base_projection()
    trained = _trained(seed=4, base=base)
    expected = _out(trained)
    half = _reference(base, {"a": (_lora_layers(trained, "default"), trained.projection.weight.clone())}, [0.5])
    trained.save_lora_adapter(tmp_path)

    def loaded():
        pipe = _pipe()
        with torch.no_grad():
            pipe.transformer.projection.weight.copy_(base)
        pipe.load_lora_weights(tmp_path, adapter_name="a")
        return pipe

    pipe = loaded()
    pipe.fuse_lora()
    _close(_out(pipe.transformer), expected)
    pipe.unfuse_lora()
    _close(_out(pipe.transformer), expected)
    assert not any(layer.merged for layer in _tuner_layers(pipe.transformer))
    pipe.disable_lora()
    assert torch.equal(pipe.transformer.projection.weight, base)

    # fuse + unload keeps the fused adapter, projection included (what the training script saves)
    pipe = loaded()
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    _close(pipe.transformer.projection.weight, trained.projection.weight)
    _close(_out(pipe.transformer), expected)

    # lora_scale reaches the projection like the LoRA layers: fused at 0.5 == unfused run at scale 0.5
    pipe = loaded()
    _close(_out(pipe.transformer, attention_kwargs={"scale": 0.5}), _out(half))
    pipe.fuse_lora(lora_scale=0.5)
    _close(_out(pipe.transformer), _out(half))
    # attention_kwargs scale 0 is the model without the adapter
    pipe = loaded()
    _close(_out(pipe.transformer, attention_kwargs={"scale": 0.0}), _out(_pipe_with_projection(base).transformer))


def _pipe_with_projection(projection):
    pipe = _pipe()
    with torch.no_grad():
        pipe.transformer.projection.weight.copy_(projection)
    return pipe


def _tuner_layers(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


def test_two_adapters_combine_like_their_lora_layers(tmp_path):
    base = _base_projection()
    a, b = _trained(seed=5, base=base), _trained(seed=6, base=base)
    a.save_lora_adapter(tmp_path / "a")
    SanaRestorationPipeline.save_lora_weights(
        tmp_path / "b", transformer_lora_layers=get_peft_model_state_dict(b), condition_projection=b.projection
    )
    adapters = {
        "a": (_lora_layers(a, "default"), a.projection.weight.clone()),
        "b": (_lora_layers(b, "default"), b.projection.weight.clone()),
    }
    pipe = _pipe_with_projection(base)
    base_out = _out(pipe.transformer)
    pipe.load_lora_weights(tmp_path / "a", adapter_name="a")
    pipe.load_lora_weights(tmp_path / "b", adapter_name="b")
    _close(_out(pipe.transformer), _out(b))  # the adapter loaded last is the active one

    pipe.set_adapters(["a", "b"], [0.7, 0.4])
    _close(_out(pipe.transformer), _out(_reference(base, adapters, [0.7, 0.4])))
    pipe.set_adapters("a")
    _close(_out(pipe.transformer), _out(a))
    assert torch.equal(pipe.transformer.projection.weight, a.projection.weight)

    pipe.set_adapters(["a", "b"], [0.7, 0.4])
    pipe.disable_lora()
    _close(_out(pipe.transformer), base_out)
    pipe.enable_lora()
    _close(_out(pipe.transformer), _out(_reference(base, adapters, [0.7, 0.4])))

    pipe.delete_adapters("b")
    pipe.set_adapters("a", 0.5)
    _close(_out(pipe.transformer), _out(_reference(base, {"a": adapters["a"]}, [0.5])))
    pipe.unload_lora_weights()
    assert torch.equal(pipe.transformer.projection.weight, base)
    _close(_out(pipe.transformer), base_out)


def test_sidecar_and_lora_file_come_from_the_hub(tmp_path, hub):
    from huggingface_hub import create_repo, upload_folder

    trained = _trained(seed=7)
    trained.save_lora_adapter(tmp_path / "lora")
    create_repo("org/restore-lora", token="hf_test")
    upload_folder(repo_id="org/restore-lora", folder_path=tmp_path / "lora", token="hf_test")
    pipe = _pipe()
    pipe.load_lora_weights("org/restore-lora", cache_dir=tmp_path / "cache")
    assert torch.equal(pipe.transformer.projection.weight, trained.projection.weight)
    _close(_out(pipe.transformer), _out(trained))


def test_text_to_image_sana_lora_applies_to_the_wrapped_model(tmp_path):
    """A SanaPipeline LoRA (keys `transformer.transformer_blocks.*`, relative to SANA) loads onto the wrapped SANA."""
    sana = get_tiny_transformer()
    sana.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights="gaussian"))
    with torch.no_grad():
        for name, parameter in sana.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.3)
    SanaPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(sana))
    pipe = _pipe()
    pipe.load_lora_weights(tmp_path)
    inputs = _inputs()
    with torch.no_grad():
        expected = sana(
            inputs["hidden_states"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
            timestep=inputs["timestep"],
            encoder_attention_mask=inputs["encoder_attention_mask"],
        ).sample
    _close(_out(pipe.transformer), expected)  # the projection is still the identity


def test_pickles_and_bad_files_are_refused_clearly(tmp_path):
    trained = _trained(seed=8)
    pipe = _pipe()
    with pytest.raises(ValueError, match="safetensors only"):
        pipe.load_lora_weights(tmp_path, use_safetensors=False)
    with pytest.raises(ValueError, match="safetensors only"):
        trained.load_lora_adapter(tmp_path, use_safetensors=False)
    with pytest.raises(ValueError, match="safetensors only"):
        SanaRestorationPipeline.save_lora_weights(
            tmp_path, transformer_lora_layers=get_peft_model_state_dict(trained), safe_serialization=False
        )
    with pytest.raises(ValueError, match="safetensors only"):
        trained.save_lora_adapter(tmp_path, safe_serialization=False)

    trained.save_lora_adapter(tmp_path / "wrong")
    save_file({"projection.weight": torch.zeros(4, 6, 1, 1)}, str(tmp_path / "wrong" / "condition_projection.safetensors"))
    with pytest.raises(ValueError, match=r"shape \(4, 6, 1, 1\).*\(4, 8, 1, 1\)"):
        pipe.load_lora_weights(tmp_path / "wrong")
    assert not getattr(pipe.transformer, "peft_config", None)  # nothing was loaded

    with pytest.raises(ValueError, match="neither LoRA weights"):
        pipe.load_lora_weights({"transformer.transformer.proj_out.weight": torch.zeros(4, 8)})
    with pytest.raises(ValueError, match="no LoRA weights"):
        pipe.load_lora_weights({"text_encoder.layers.0.lora_A.weight": torch.zeros(4, 8)})
