"""The calibration key of a MODEL (nodes/_host.py model_fingerprint): the same before and after ComfyUI loads the
model (loading writes LoRA patches into the weights in place), and different for different LoRAs at the same
strength."""

import comfy.model_management
import torch

from .harness import node_class, tiny_model


def _fingerprint(model):
    import sys

    host = sys.modules[node_class("PreprintOptimalStepsSearch").__module__.rsplit(".", 1)[0] + "._host"]
    return host.model_fingerprint(model)


def _lora(model, seed, strength=1.0):
    patched = model.clone()
    name, weight = next((k, v) for k, v in patched.model.state_dict().items()
                        if k.startswith("diffusion_model.") and k.endswith(".weight") and v.ndim == 2)
    g = torch.Generator().manual_seed(seed)
    patched.add_patches({name: ("diff", (torch.randn(weight.shape, generator=g) * 0.01,))}, strength)
    return patched


def test_fingerprint_is_the_same_before_and_after_loading_and_tells_loras_apart():
    base = tiny_model("sd15")
    plain = _fingerprint(base)
    lora = _lora(base, 1)
    before = _fingerprint(lora)
    assert before != plain
    comfy.model_management.load_models_gpu([lora])
    try:
        assert _fingerprint(lora) == before  # the patched weights are read from the backup
        assert _fingerprint(base) == plain  # a clone sharing the loaded weights is still the plain model
    finally:
        comfy.model_management.unload_all_models()
    assert _fingerprint(_lora(base, 2)) != before  # another LoRA of the same shape and strength
    assert _fingerprint(_lora(base, 1, 0.5)) != before  # the same LoRA at another strength
    assert _fingerprint(_lora(base, 1)) == before
