"""The trained proving-ground toys in real ComfyUI: they load through their node and sample through ComfyUI,
the training command writes loadable weights reproducibly, and broken weights fail clearly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from preprint.proving import models

from .harness import run_node


@pytest.fixture(scope="module")
def sd15_toy(comfy_host):
    return run_node("PreprintProvingGroundModel", architecture="sd15")


@pytest.fixture(scope="module")
def flux_toy(comfy_host):
    return run_node("PreprintProvingGroundModel", architecture="flux")


def test_sd15_toy_samples_through_comfyui_from_a_caption(sd15_toy):
    """Wiring, not effect: the trained toy loads through its node and draws through ComfyUI's sampler and its
    VAE. How well it follows captions is measured in benchmarks/proving_ground.py."""
    model, clip, vae = sd15_toy
    images = models.generate(model, clip, vae, ["a red circle in the centre on a white background", ""], steps=8)
    assert images.shape == (2, 3, 128, 128) and torch.isfinite(images).all()
    assert not torch.allclose(images[0], images[1])  # the caption reaches the model


def test_flux_toy_samples_through_comfyui_with_the_dit_cache(flux_toy):
    import comfy.patcher_extension as pe

    model, clip, vae = flux_toy
    assert vae.latent_channels == 16
    # at the default threshold 0.12 the toy never skips (0 of 20 calls: the comparison was of the model with
    # itself); at 0.3 it skips 10 of 20 calls
    cached = run_node("PreprintDiTBlockCache", model=model, threshold=0.3, extrapolation_order=2,
                      max_consecutive_skips=3, start_percent=0.0, end_percent=1.0)[0]
    text = ["a green square on the left on a white background"]
    plain = models.generate(model, clip, vae, text, steps=20, cfg=4.0, sampler="euler", scheduler="simple")
    fast = models.generate(cached, clip, vae, text, steps=20, cfg=4.0, sampler="euler", scheduler="simple")
    report = cached.get_wrappers(pe.WrappersMP.OUTER_SAMPLE, "preprint_dit_cache")[0].last_report
    assert report["calls"] == 20 and plain.shape == fast.shape == (1, 3, 128, 128)
    assert report["counts"].skipped_fraction() > 0.3  # 42% of block evaluations
    # the cache costs 0.0034 of the image (relative L2); extrapolating with order 1 costs 0.025, one stream's
    # residual added to every chunk 0.028, residuals taken after in-place blocks wrote their input 0.15
    assert torch.isfinite(fast).all() and float((fast - plain).norm() / plain.norm()) < 0.01


def _copy_weights(tmp_path, arch):
    spec = models.TOYS[arch]
    for name in (spec.model_file, spec.vae_file):
        shutil.copy(models.WEIGHTS_DIR / name, tmp_path / name)
    return tmp_path / spec.model_file


def test_changed_text_encoder_is_caught_by_the_fingerprint(comfy_host, tmp_path):
    from safetensors.torch import load_file, save_file

    path = _copy_weights(tmp_path, "sd15")
    tensors = load_file(str(path))
    _, meta = models.load_weights(path)
    meta["text_fingerprint"] = [v + 0.5 for v in meta["text_fingerprint"]]
    save_file(tensors, str(path), metadata={"preprint": json.dumps(meta)})
    with pytest.raises(models.ProvingWeightsError, match="text-encoder outputs") as info:
        models.load_toy("sd15", folder=tmp_path)
    assert str(path) in str(info.value) and models.REBUILD_COMMAND in str(info.value)


@pytest.mark.parametrize("recorded, sigma_max", [({}, 14.6146), (models.LOW_SIGMA_SAMPLING, 5.0575)])
def test_the_toy_samples_on_the_noise_schedule_its_file_records(comfy_host, tmp_path, recorded, sigma_max):
    from safetensors.torch import load_file, save_file

    path = _copy_weights(tmp_path, "sd15")
    tensors = load_file(str(path))
    _, meta = models.load_weights(path)
    meta["sampling_settings"] = recorded  # {}: a file from before the record, trained on SD1.5's own schedule
    save_file(tensors, str(path), metadata={"preprint": json.dumps(meta)})
    sampling = models.load_toy("sd15", folder=tmp_path)[0].get_model_object("model_sampling")
    assert sampling.sigma_max.item() == pytest.approx(sigma_max, abs=1e-3)
    assert sampling.sigma_min.item() == pytest.approx(0.0292, abs=1e-3)
    meta["sampling_settings"] = {"linear_end": 0.0066, "shift": 3.0}  # not a key of an EPS schedule
    save_file(tensors, str(path), metadata={"preprint": json.dumps(meta)})
    with pytest.raises(models.ProvingWeightsError, match="noise schedule this pack cannot build") as info:
        models.load_toy("sd15", folder=tmp_path)
    assert str(path) in str(info.value) and models.REBUILD_COMMAND in str(info.value)


def test_weights_of_another_layout_are_refused(comfy_host, tmp_path):
    _copy_weights(tmp_path, "sd15")
    spec = models.TOYS["sd15"]
    shutil.copy(models.WEIGHTS_DIR / models.TOYS["flux"].model_file, tmp_path / spec.model_file)
    with pytest.raises(models.ProvingWeightsError, match="does not fit") as info:
        models.load_toy("sd15", folder=tmp_path)
    assert spec.model_file in str(info.value)


def test_node_reports_a_missing_weight_file_when_the_graph_runs(comfy_host, tmp_path, monkeypatch):
    from preprint.runner.comfy_host import HostError

    monkeypatch.setenv(models.WEIGHTS_ENV, str(tmp_path))
    prompt = {
        "1": {"class_type": "PreprintProvingGroundModel", "inputs": {"architecture": "sd15"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red circle"}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "4": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 0, "steps": 1, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["2", 0], "negative": ["2", 0],
                                                   "latent_image": ["3", 0], "denoise": 1.0}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
    }
    with pytest.raises(HostError) as info:
        comfy_host.execute(prompt)
    assert "unet_sd15.safetensors is missing" in str(info.value)
    assert "train-proving-ground --only sd15" in str(info.value)


def test_training_command_builds_loadable_weights_reproducibly(comfy_host, tmp_path):
    """The training pipeline end to end at a few steps per stage (--smoke): the files it writes load through
    the same loader as the shipped ones, and the same seed writes the same weights."""
    from preprint.runner.cli import main

    for out in ("a", "b"):
        assert main(["train-proving-ground", "--smoke", "--only", "sd15", "--out", str(tmp_path / out)]) == 0
    for name in (models.TOYS["sd15"].model_file, models.TOYS["sd15"].vae_file):
        a, meta = models.load_weights(tmp_path / "a" / name)
        b, _ = models.load_weights(tmp_path / "b" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert meta["budget"]["model_steps"] == 2
    model, clip, vae = models.load_toy("sd15", folder=tmp_path / "a")
    image = models.generate(model, clip, vae, ["a red circle"], steps=2, width=64, height=64)
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


def test_vae_from_reuses_only_a_vae_of_the_same_recipe(comfy_host, tmp_path):
    """--vae-from trains the diffusion model on the VAE found there, and refuses a VAE trained another way
    (whose latents the shipped diffusion model would not match)."""
    from preprint.runner.cli import main

    smoke = ["train-proving-ground", "--smoke", "--only", "sd15"]
    assert main([*smoke, "--out", str(tmp_path / "a")]) == 0
    vae_name = models.TOYS["sd15"].vae_file
    assert main([*smoke, "--out", str(tmp_path / "b"), "--vae-from", str(tmp_path / "a")]) == 0
    a, _ = models.load_weights(tmp_path / "a" / vae_name)
    b, _ = models.load_weights(tmp_path / "b" / vae_name)
    assert all(torch.allclose(a[k], b[k], atol=1e-2, rtol=1e-2) for k in a)  # the same VAE, re-saved
    assert main([*smoke, "--out", str(tmp_path / "c"), "--vae-from", str(tmp_path / "a"), "--seed", "1"]) == 3
    state, meta = models.load_weights(tmp_path / "a" / vae_name)
    meta["budget"]["vae_crop"] += 8
    models.save_weights(tmp_path / "d" / vae_name, state, meta)
    assert main([*smoke, "--out", str(tmp_path / "e"), "--vae-from", str(tmp_path / "d")]) == 3
    assert not (tmp_path / "e" / models.TOYS["sd15"].model_file).exists()
