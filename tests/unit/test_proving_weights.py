"""Proving-ground weight files: what ships is readable by safetensors alone, and every broken file gives an
error that names the file and the command that rebuilds it. Also the training helpers that need no ComfyUI."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from preprint.proving import models, train

safetensors = pytest.importorskip("safetensors")


@pytest.mark.parametrize("arch", models.ARCHITECTURES)
def test_shipped_weights_load_with_safetensors_and_carry_their_metadata(arch):
    spec = models.TOYS[arch]
    for name, part in ((spec.model_file, "model"), (spec.vae_file, "vae")):
        path = models.WEIGHTS_DIR / name
        tensors, meta = models.load_weights(path, arch)
        assert meta["arch"] == arch and meta["part"] == part
        assert meta["text_seed"] == models.TEXT_SEED and len(meta["text_fingerprint"]) == 3
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())
    total = sum(p.stat().st_size for p in models.WEIGHTS_DIR.glob("*.safetensors"))
    assert total <= 26 * 2**20, f"{total / 2**20:.1f} MiB of weights"


def _expect_error(path, *fragments):
    with pytest.raises(models.ProvingWeightsError) as info:
        models.load_weights(path, "sd15")
    message = str(info.value)
    assert str(path) in message and models.REBUILD_COMMAND + " --only sd15" in message
    for fragment in fragments:
        assert fragment in message
    return message


def test_missing_file_names_the_file_and_the_rebuild_command(tmp_path):
    _expect_error(tmp_path / "unet_sd15.safetensors", "missing")


def test_corrupt_file_is_reported_as_unreadable(tmp_path):
    path = tmp_path / "unet_sd15.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + bytes(64))
    _expect_error(path, "unreadable")


def test_truncated_copy_of_a_real_file_is_reported(tmp_path):
    real = (models.WEIGHTS_DIR / models.TOYS["sd15"].vae_file).read_bytes()
    path = tmp_path / "vae_sd.safetensors"
    path.write_bytes(real[: len(real) // 2])
    _expect_error(path, "unreadable")


def test_file_without_preprint_metadata_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "unet_sd15.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    _expect_error(path, "metadata")


def test_saved_weights_round_trip_in_float16(tmp_path):
    path = tmp_path / "x.safetensors"
    sd = {"a": torch.randn(3, 4), "steps": torch.tensor([7])}
    models.save_weights(path, sd, {"arch": "sd15", "note": "x"})
    back, meta = models.load_weights(path)
    assert meta == {"arch": "sd15", "note": "x", "format": models.FORMAT_VERSION}
    assert torch.allclose(back["a"], sd["a"].half().float()) and back["steps"].tolist() == [7]
    with safetensors.safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["preprint"])["arch"] == "sd15"


@pytest.mark.parametrize("scale,shift", [(0.18215, 0.0), (0.3611, 0.1159)])
def test_latent_normalisation_is_an_exact_reparametrisation(scale, shift):
    """The rescaled VAE decodes every latent it encodes to the same image as before, and ComfyUI's latent
    format (x - shift) * scale sees zero mean, unit variance per channel."""
    torch.manual_seed(0)
    c = 4
    vae = SimpleNamespace(encoder=torch.nn.Conv2d(3, 2 * c, 3, padding=1), quant_conv=torch.nn.Conv2d(2 * c, 2 * c, 1),
                          post_quant_conv=torch.nn.Conv2d(c, 5, 1))
    images = torch.randn(16, 3, 8, 8) * 2 + 0.5

    def decode_input(x):
        mean = vae.quant_conv(vae.encoder(x)).chunk(2, dim=1)[0]
        return mean, vae.post_quant_conv(mean)

    with torch.no_grad():
        _, before = decode_input(images)
        fmt = SimpleNamespace(scale_factor=scale, shift_factor=shift, process_in=lambda z: (z - shift) * scale)
        train.normalise_latent_(vae, images, fmt)
        latent, after = decode_input(images)
    assert torch.allclose(after, before, atol=1e-4)
    seen = fmt.process_in(latent)
    assert torch.allclose(seen.mean(dim=(0, 2, 3)), torch.zeros(c), atol=1e-4)
    assert torch.allclose(seen.std(dim=(0, 2, 3)), torch.ones(c), atol=1e-4)
