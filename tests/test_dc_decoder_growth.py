# Copyright 2026 The diffusers-restore authors. Licensed under the Apache License, Version 2.0.
"""grow_dc_decoder: a deeper AutoencoderDC decoder that starts out decoding exactly as the original."""

import pytest
import torch
from diffusers import AutoencoderDC

from diffusers_restore import grow_dc_decoder
from diffusers_restore.testing import get_tiny_vae


def _latents(vae, seed=0, batch=2, size=6):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vae.config.latent_channels, size, size, generator=generator)


@pytest.mark.parametrize("norm_types", ["rms_norm", "batch_norm"])
def test_grown_decoder_decodes_exactly_as_the_original(norm_types):
    # the tiny VAE's last stage is an EfficientViTBlock stage, the others ResBlock stages: both kinds grow
    vae = get_tiny_vae(0, decoder_norm_types=norm_types)
    grown = grow_dc_decoder(vae, [1, 2, 3])
    assert list(grown.config.decoder_layers_per_block) == [2, 3, 4]
    assert list(vae.config.decoder_layers_per_block) == [1, 1, 1]  # the original is untouched
    assert sum(p.numel() for p in grown.decoder.parameters()) > sum(p.numel() for p in vae.decoder.parameters())
    latents = _latents(vae)
    images = torch.rand(1, 3, 24, 24) * 2 - 1
    with torch.no_grad():
        assert torch.equal(grown.decode(latents).sample, vae.decode(latents).sample)
        assert torch.equal(grown.encode(images).latent, vae.encode(images).latent)


def test_new_blocks_learn_from_the_first_step():
    vae = get_tiny_vae(0)
    grown = grow_dc_decoder(vae, [0, 0, 1])
    new_block = grown.decoder.up_blocks[2][-1]
    loss = grown.decode(_latents(vae)).sample.square().mean()
    loss.backward()
    assert new_block.attn.norm_out.weight.grad.abs().sum() > 0
    assert new_block.conv_out.norm.weight.grad.abs().sum() > 0
    # the blocks it replaced nothing of: the original last block still holds its original weights
    assert torch.equal(grown.decoder.up_blocks[2][0].conv_out.norm.weight, vae.decoder.up_blocks[2][0].conv_out.norm.weight)


def test_grown_autoencoder_round_trips_as_a_plain_autoencoder_dc(tmp_path):
    vae = get_tiny_vae(1, decoder_block_types="ResBlock", decoder_qkv_multiscales=((), (), ()))
    grown = grow_dc_decoder(vae, [0, 1, 2])
    with torch.no_grad():  # move the new blocks away from the identity so the round trip is not trivially equal
        for parameter in grown.decoder.up_blocks[2][-1].parameters():
            parameter.add_(0.1)
    grown.save_pretrained(tmp_path / "vae")
    loaded = AutoencoderDC.from_pretrained(tmp_path / "vae")
    latents = _latents(vae, seed=3)
    with torch.no_grad():
        assert torch.equal(loaded.decode(latents).sample, grown.decode(latents).sample)
        assert not torch.equal(loaded.decode(latents).sample, vae.decode(latents).sample)
    assert list(loaded.config.decoder_layers_per_block) == [1, 2, 3]


def test_bad_growth_is_refused_with_its_reason():
    vae = get_tiny_vae(0)
    with pytest.raises(ValueError, match="one count per decoder stage \\(3\\)"):
        grow_dc_decoder(vae, [1, 2])
    with pytest.raises(ValueError, match=">= 0"):
        grow_dc_decoder(vae, [0, -1, 0])
    empty_first = get_tiny_vae(0, decoder_layers_per_block=(0, 1, 1))
    with pytest.raises(ValueError, match=r"stage\(s\) \[0\] have no blocks"):
        grow_dc_decoder(empty_first, [1, 0, 0])
    assert grow_dc_decoder(empty_first, [0, 1, 1]).config.decoder_layers_per_block == [0, 2, 2]
