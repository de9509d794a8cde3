# Copyright 2026 The diffusers-restore authors. Licensed under the Apache License, Version 2.0.
"""The shipped accelerate configs (examples/accelerate_configs/) are valid for accelerate: every key is an option of
`accelerate launch`, the files load with accelerate's config reader, and the FSDP one builds accelerate's FSDP2 plugin
wrapping SANA's transformer blocks. (They cannot run here: accelerate enables FSDP and DeepSpeed on accelerators only.)"""

from pathlib import Path

import pytest

CONFIGS = Path(__file__).with_name("accelerate_configs")


def _yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("name, kind", [("fsdp", "FSDP"), ("deepspeed_zero2", "DEEPSPEED"),
                                        ("deepspeed_zero3", "DEEPSPEED")])
def test_configs_are_valid_accelerate_configs(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    path = CONFIGS / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert config.distributed_type.name == kind and config.mixed_precision == "bf16"
    options = {action.dest for action in launch_command_parser()._actions}
    raw = _yaml(path)
    nested = raw.get("fsdp_config", {}) | raw.get("deepspeed_config", {})
    top = set(raw) - {"fsdp_config", "deepspeed_config", "compute_environment", "distributed_type", "use_cpu"}
    unknown = sorted(key for key in set(nested) | top if key not in options)
    assert not unknown, f"{path.name}: not options of `accelerate launch`: {unknown}"
    if kind == "DEEPSPEED":
        assert nested["zero_stage"] == int(name[-1])


def test_fsdp_config_builds_fsdp2_wrapping_sana_blocks():
    from accelerate.utils import FullyShardedDataParallelPlugin
    from diffusers.models.transformers.sana_transformer import SanaTransformerBlock

    fsdp = _yaml(CONFIGS / "fsdp.yaml")["fsdp_config"]
    assert fsdp["fsdp_version"] == 2  # the EMA under sharding needs per-parameter shards (train_paired refuses FSDP1)
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == SanaTransformerBlock.__name__
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=fsdp["fsdp_version"],
        auto_wrap_policy=fsdp["fsdp_auto_wrap_policy"].lower(),
        transformer_cls_names_to_wrap=[fsdp["fsdp_transformer_layer_cls_to_wrap"]],
        reshard_after_forward=fsdp["fsdp_reshard_after_forward"],
        state_dict_type=fsdp["fsdp_state_dict_type"],
    )
    assert plugin.fsdp_version == 2 and plugin.state_dict_type.name == "SHARDED_STATE_DICT"
