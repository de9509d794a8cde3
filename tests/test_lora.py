"""LoRA through the pipeline: the file formats, the trained condition projection that travels with them (loaded as a
LoRA on the 1x1 convolution), and how adapters combine, fuse and unload.

References are built independently of the loading code: a model that holds the adapters it was trained with
(`add_adapter` + weights set in place) and whose projection is set by hand to the formula of the transformer's
docstring, `P = P_0 + sum_a s * w_a * (P_a - P_0)`.
"""

import logging
import os
import pathlib

import numpy as np
import pytest
import torch
from diffusers import SanaPipeline
from peft import LoraConfig, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from diffusers_restore import ConcatConditionedTransformer, SanaRestorationPipeline
from diffusers_restore.models.safe_weights import UnsafeWeightsError
from diffusers_restore.testing import get_tiny_components, get_tiny_transformer

TARGETS = ["to_q", "to_k", "to_v"]
# Written by the code before the projection became a LoRA target (main at 19bb8bc): a 1-layer tiny model's adapter
# (r=2, lora_alpha=4 on to_q/to_k/to_v, so its scale is 2) with a trained projection, saved by
# `ConcatConditionedTransformer.save_lora_adapter` (`transformer_lora/`, as the training script writes it) and by
# `SanaRestorationPipeline.save_lora_weights(..., condition_projection=..., transformer_lora_adapter_metadata=...)`.
FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "restoration_lora"


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


def _pipe(projection=None):
    pipe = SanaRestorationPipeline.from_sana_pipeline(SanaPipeline(**get_tiny_components(0)))
    pipe.set_progress_bar_config(disable=True)
    if projection is not None:
        with torch.no_grad():
            pipe.transformer.projection.weight.copy_(projection)
    return pipe


def _base_projection(seed=100):
    """A trained-looking (non-identity) projection for the model the LoRAs are loaded into: P_0."""
    return torch.randn(4, 8, 1, 1, generator=torch.Generator().manual_seed(seed)) * 0.5


def _trained(seed, base=None):
    """A wrapper after a LoRA run: a non-zero adapter and a projection trained away from the base."""
    model = ConcatConditionedTransformer.from_transformer(get_tiny_transformer())
    if base is not None:
        with torch.no_grad():
            model.projection.weight.copy_(base)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
        model.projection.weight.add_(torch.randn(4, 8, 1, 1, generator=generator))
    return model


def _reference(base, adapters, weights, config=None):
    """A model with the given trained adapters added in place, `set_adapters(names, weights)`, and its projection
    set to `P_0 + sum w_a (P_a - P_0)`. `adapters`: {name: (LoRA state dict relative to the model, P_a)}."""
    model = ConcatConditionedTransformer.from_transformer(get_tiny_transformer())
    projection = base.clone()
    for (name, (layers, trained_projection)), weight in zip(adapters.items(), weights):
        model.add_adapter(config or LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS), adapter_name=name)
        result = set_peft_model_state_dict(model, layers, adapter_name=name)
        assert not result.unexpected_keys
        projection += weight * (trained_projection - base)
    model.set_adapters(list(adapters), weights)
    with torch.no_grad():
        model.projection.weight.copy_(projection)
    return model


def _adapter(model):
    return get_peft_model_state_dict(model), model.projection.weight.detach().clone()


def _lora_modules(model):
    return [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]


def test_files_written_before_the_projection_became_a_lora_target_still_load():
    sidecar = load_file(FIXTURES / "transformer_lora" / "condition_projection.safetensors")["projection.weight"]
    layers = load_file(FIXTURES / "transformer_lora" / "pytorch_lora_weights.safetensors")
    config = LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS)
    expected = _out(_reference(torch.zeros(4, 8, 1, 1), {"a": (layers, sidecar)}, [1.0], config))

    model = ConcatConditionedTransformer.from_transformer(get_tiny_transformer())
    model.load_lora_adapter(FIXTURES / "transformer_lora")
    _close(_out(model), expected)
    for source in (FIXTURES / "transformer_lora", FIXTURES / "pipeline_lora"):
        pipe = _pipe()
        pipe.load_lora_weights(source)
        _close(_out(pipe.transformer), expected)  # the alpha of the metadata is kept (scale 2 on the layers)
        assert "projection" in _lora_modules(pipe.transformer)


def test_training_output_folder_loads_through_the_pipeline(tmp_path):
    """`examples/train_paired.py --use_lora` saves `<output_dir>/transformer_lora` with `save_lora_adapter`."""
    trained = _trained(seed=1)
    expected = _out(trained)
    trained.save_lora_adapter(tmp_path / "transformer_lora")
    assert sorted(os.listdir(tmp_path / "transformer_lora")) == [
        "condition_projection.safetensors",
        "pytorch_lora_weights.safetensors",
    ]

    pipe = _pipe()
    before = _out(pipe.transformer)
    pipe.load_lora_weights(tmp_path / "transformer_lora")
    _close(_out(pipe.transformer), expected)
    assert (before - expected).abs().max() > 1e-2

    # end to end: the loaded projection makes the pipeline look at the degraded image
    image = (np.random.default_rng(0).random((24, 24, 3)) * 255).astype(np.uint8)
    run = dict(num_inference_steps=2, guidance_scale=1.0, output_type="np")
    first = pipe(image, generator=torch.Generator().manual_seed(0), **run).images
    second = pipe(255 - image, generator=torch.Generator().manual_seed(0), **run).images
    assert np.abs(first - second).max() > 1e-3


def test_pipeline_file_carries_the_projection(tmp_path):
    trained = _trained(seed=2)
    expected = _out(trained)
    SanaRestorationPipeline.save_lora_weights(
        tmp_path, transformer_lora_layers=get_peft_model_state_dict(trained), condition_projection=trained.projection
    )
    keys = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    assert torch.equal(keys["transformer.projection.weight"], trained.projection.weight)
    assert all(k.startswith("transformer.transformer.") for k in keys if k != "transformer.projection.weight")
    pipe = _pipe()
    pipe.load_lora_weights(tmp_path)
    _close(_out(pipe.transformer), expected)

    # without the projection, the loading pipeline keeps its own
    layers = get_peft_model_state_dict(trained)
    SanaRestorationPipeline.save_lora_weights(tmp_path / "bare", transformer_lora_layers=layers)
    other = _pipe()
    other.load_lora_weights(tmp_path / "bare")
    assert "projection" not in _lora_modules(other.transformer)


def test_a_loaded_adapter_saves_its_projection_as_its_lora_pair(tmp_path):
    base = _base_projection()
    trained = _trained(seed=3, base=base)
    trained.save_lora_adapter(tmp_path / "trained")
    pipe = _pipe(base)
    pipe.load_lora_weights(tmp_path / "trained", adapter_name="a")
    expected = _out(pipe.transformer)

    pipe.transformer.save_lora_adapter(tmp_path / "model", adapter_name="a")
    assert os.listdir(tmp_path / "model") == ["pytorch_lora_weights.safetensors"]
    SanaRestorationPipeline.save_lora_weights(
        tmp_path / "pipe",
        transformer_lora_layers=get_peft_model_state_dict(pipe.transformer, adapter_name="a"),
        transformer_lora_adapter_metadata=pipe.transformer.peft_config["a"].to_dict(),
    )
    assert "transformer.projection.lora_A.weight" in load_file(tmp_path / "pipe" / "pytorch_lora_weights.safetensors")
    for folder in ("model", "pipe"):
        again = _pipe(base)
        again.load_lora_weights(tmp_path / folder)
        _close(_out(again.transformer), expected)


def test_unload_restores_the_projection_before_loading(tmp_path):
    base = _base_projection()
    pipe = _pipe(base)
    before = _out(pipe.transformer)
    trained = _trained(seed=3, base=base)
    trained.save_lora_adapter(tmp_path)

    pipe.load_lora_weights(tmp_path)
    _close(_out(pipe.transformer), _out(trained))
    assert torch.equal(pipe.transformer.projection.weight, base)  # the delta lives in the LoRA layer
    pipe.unload_lora_weights()
    assert torch.equal(pipe.transformer.projection.weight, base)
    assert not _lora_modules(pipe.transformer)
    _close(_out(pipe.transformer), before)


def test_fuse_unfuse_and_scale(tmp_path):
    base = _base_projection()
    trained = _trained(seed=4, base=base)
    expected = _out(trained)
    half = _out(_reference(base, {"a": _adapter(trained)}, [0.5]))
    trained.save_lora_adapter(tmp_path)

    def loaded():
        pipe = _pipe(base)
        pipe.load_lora_weights(tmp_path, adapter_name="a")
        return pipe

    pipe = loaded()
    pipe.fuse_lora()
    _close(_out(pipe.transformer), expected)
    _close(pipe.transformer.projection.weight, trained.projection.weight)
    pipe.unfuse_lora()
    _close(_out(pipe.transformer), expected)
    _close(pipe.transformer.projection.weight, base)
    pipe.disable_lora()
    _close(_out(pipe.transformer), _out(_pipe(base).transformer))

    # fuse + unload keeps the fused adapter, projection included (what the training script saves)
    pipe = loaded()
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    _close(pipe.transformer.projection.weight, trained.projection.weight)
    _close(_out(pipe.transformer), expected)

    # the LoRA scale reaches the projection like the other layers: a run at scale 0.5 == fused at 0.5; 0 = no adapter
    pipe = loaded()
    _close(_out(pipe.transformer, attention_kwargs={"scale": 0.5}), half)
    _close(_out(pipe.transformer, attention_kwargs={"scale": 0.0}), _out(_pipe(base).transformer))
    pipe.fuse_lora(lora_scale=0.5)
    _close(_out(pipe.transformer), half)


def test_two_adapters_combine_like_their_lora_layers(tmp_path):
    base = _base_projection()
    a, b = _trained(seed=5, base=base), _trained(seed=6, base=base)
    a.save_lora_adapter(tmp_path / "a")
    SanaRestorationPipeline.save_lora_weights(
        tmp_path / "b", transformer_lora_layers=get_peft_model_state_dict(b), condition_projection=b.projection
    )
    adapters = {"a": _adapter(a), "b": _adapter(b)}
    pipe = _pipe(base)
    base_out = _out(pipe.transformer)
    pipe.load_lora_weights(tmp_path / "a", adapter_name="a")
    pipe.load_lora_weights(tmp_path / "b", adapter_name="b")
    _close(_out(pipe.transformer), _out(b))  # the adapter loaded last is the active one

    pipe.set_adapters(["a", "b"], [0.7, 0.4])
    _close(_out(pipe.transformer), _out(_reference(base, adapters, [0.7, 0.4])))
    pipe.set_adapters("a")
    _close(_out(pipe.transformer), _out(a))

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


def test_pickled_lora_files_save_and_load_as_the_caller_asks(tmp_path):
    trained = _trained(seed=8)
    expected = _out(trained)
    SanaRestorationPipeline.save_lora_weights(
        tmp_path / "pipe",
        transformer_lora_layers=get_peft_model_state_dict(trained),
        condition_projection=trained.projection,
        safe_serialization=False,
    )
    trained.save_lora_adapter(tmp_path / "model", safe_serialization=False)
    assert os.listdir(tmp_path / "pipe") == ["pytorch_lora_weights.bin"]
    assert sorted(os.listdir(tmp_path / "model")) == ["condition_projection.bin", "pytorch_lora_weights.bin"]
    for folder in ("pipe", "model"):
        pipe = _pipe()
        pipe.load_lora_weights(tmp_path / folder)
        _close(_out(pipe.transformer), expected)
    with pytest.raises(OSError):  # use_safetensors=True refuses the pickle, as in diffusers
        _pipe().load_lora_weights(tmp_path / "pipe", use_safetensors=True)


class _Payload:
    """Unpickling it would create `path`: the stand-in for code hidden in a weight file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


def test_a_pickle_with_code_is_refused_with_the_packages_error_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "lora").mkdir()
    torch.save({"transformer.projection.weight": _Payload(marker)}, tmp_path / "lora" / "pytorch_lora_weights.bin")
    trained = _trained(seed=8)
    trained.save_lora_adapter(tmp_path / "sidecar")  # safetensors LoRA, poisoned pickled projection beside it
    (tmp_path / "sidecar" / "condition_projection.safetensors").unlink()
    torch.save({"projection.weight": _Payload(marker)}, tmp_path / "sidecar" / "condition_projection.bin")
    for load in (_pipe().load_lora_weights, _pipe().transformer.load_lora_adapter):
        for folder in ("lora", "sidecar"):
            with pytest.raises(UnsafeWeightsError, match=r"holds Python objects besides tensors.*nothing in it ran"):
                load(tmp_path / folder)
    assert not marker.exists()
    # use_safetensors=True never opens the pickled sidecar: the LoRA loads with the model's own projection
    pipe = _pipe()
    pipe.load_lora_weights(tmp_path / "sidecar", use_safetensors=True)
    assert torch.equal(pipe.transformer.projection.weight, _pipe().transformer.projection.weight)
    assert not marker.exists()


def test_a_lora_without_keys_for_the_model_warns_and_goes_on(caplog):
    pipe = _pipe()
    before = _out(pipe.transformer)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights({"text_encoder.layers.0.lora_A.weight": torch.zeros(4, 8)})
        pipe.transformer.load_lora_adapter({"lora_foo": torch.tensor(2.0)}, prefix="transformer")
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("No LoRA keys associated to")]
    assert len(warnings) == 2 and all("ConcatConditionedTransformer" in w for w in warnings)
    assert not _lora_modules(pipe.transformer)
    _close(_out(pipe.transformer), before)


def test_bad_lora_files_are_refused_clearly(tmp_path):
    trained = _trained(seed=9)
    trained.save_lora_adapter(tmp_path / "wrong")
    save_file({"projection.weight": torch.zeros(4, 6, 1, 1)}, tmp_path / "wrong" / "condition_projection.safetensors")
    pipe = _pipe()
    with pytest.raises(ValueError, match=r"shape \(4, 6, 1, 1\).*\(4, 8, 1, 1\)"):
        pipe.load_lora_weights(tmp_path / "wrong")
    assert not getattr(pipe.transformer, "peft_config", None)  # nothing was loaded

    with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):
        pipe.load_lora_weights({"transformer.transformer.proj_out.weight": torch.zeros(4, 8)})
    with pytest.raises(ValueError, match="DoRA"):
        pipe.transformer.load_lora_adapter(
            {**get_peft_model_state_dict(trained), "projection.weight": trained.projection.weight.detach()},
            metadata={**trained.peft_config["default"].to_dict(), "use_dora": True},
        )
