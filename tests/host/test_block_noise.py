"""Block noise through real ComfyUI: the node's NOISE against core's Random Noise (block size 1 is the same
noise, batch indices and half precision included), block noise reaching a sampling run, and its errors."""

from __future__ import annotations

import pytest
import torch

from preprint.highres.block_noise import block_sum

from .harness import make_conds, node_class, run_node, tiny_model


def block_noise_node(seed=0, block_size=2, block_fraction=1.0):
    return run_node("PreprintBlockNoise", noise_seed=seed, block_size=block_size, block_fraction=block_fraction)[0]


def core_noise(seed):
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise

    return Noise_RandomNoise(seed)


@pytest.mark.parametrize("latent", [
    {"samples": torch.zeros(2, 4, 9, 14)},
    {"samples": torch.zeros(3, 4, 8, 8), "batch_index": [4, 1, 1]},
    {"samples": torch.zeros(1, 16, 6, 10, dtype=torch.float16)},
], ids=["batch", "batch_index", "float16"])
def test_block_size_one_is_core_random_noise_bitwise(latent):
    ours = block_noise_node(seed=123, block_size=1).generate_noise(latent)
    assert ours.dtype == latent["samples"].dtype
    assert torch.equal(ours, core_noise(123).generate_noise(latent))


def test_block_noise_is_the_block_sum_of_core_white_noise():
    latent = {"samples": torch.zeros(2, 4, 10, 7)}
    ours = block_noise_node(seed=5, block_size=2).generate_noise(latent)
    assert torch.equal(ours, block_sum(core_noise(5).generate_noise(latent), 2))
    assert block_noise_node(seed=5, block_size=2).seed == 5


def test_block_noise_reaches_a_sampling_run():
    import comfy.samplers

    model = tiny_model("sd15")
    pos, neg = make_conds("sd15")
    latent = torch.zeros(1, 4, 10, 12)

    def sample(noise_source):
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(pos, neg)
        guider.set_cfg(4.0)
        sigmas = model.get_model_object("model_sampling").sigmas.new_tensor([3.0, 1.5, 0.5, 0.0])
        sampler = comfy.samplers.sampler_object("euler")
        return guider.sample(noise_source.generate_noise({"samples": latent}), latent, sampler, sigmas, seed=0)

    plain = sample(core_noise(1))
    assert torch.equal(sample(block_noise_node(seed=1, block_size=1)), plain)
    blocky = sample(block_noise_node(seed=1, block_size=2))
    assert torch.isfinite(blocky).all() and not torch.allclose(blocky, plain)


def test_widget_checks_name_the_node():
    cls = node_class("PreprintBlockNoise")
    assert cls.validate_inputs(block_size=2, block_fraction=0.5) is True
    for bad in ({"block_size": 2, "block_fraction": 1.5}, {"block_size": 0, "block_fraction": 1.0}):
        message = cls.validate_inputs(**bad)
        assert isinstance(message, str) and message.startswith("Block Noise (Preprint)")


def test_a_block_larger_than_the_latent_is_a_clear_error_naming_the_node():
    noise = block_noise_node(block_size=8)
    with pytest.raises(ValueError, match=r"^Block Noise \(Preprint\): block_size = 8 is larger than the latent"):
        noise.generate_noise({"samples": torch.zeros(1, 4, 6, 20)})
