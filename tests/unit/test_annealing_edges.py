"""Annealing guidance scale (arXiv:2506.24108): configuration validation, the scheduler's inputs, the file
format's metadata and the sampler's edge cases (lambda bounds, sigma lists through 1.0, batch sigmas)."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from preprint.guidance.annealing import (
    GuidanceScheduler,
    GuidedPrediction,
    SchedulerConfig,
    SchedulerFileError,
    constant_scheduler,
    load_scheduler,
    sample_annealing_guidance,
    save_scheduler,
    timestep_from_noise_level,
)


def random_scheduler(config: SchedulerConfig, seed: int = 0) -> GuidanceScheduler:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (o, i) in zip(config.layer_names(), config.layer_shapes(), strict=True):
        tensors[f"{name}.weight"] = torch.randn(o, i, generator=g) / i**0.5
        tensors[f"{name}.bias"] = 0.1 * torch.randn(o, generator=g)
    return GuidanceScheduler(config, tensors)


# --- configuration --------------------------------------------------------------------------------------------


def test_config_defaults_follow_the_authors_scalar_mlp():
    """The authors' ScalarMLP: 4 + 4 + 4 embedding features, t / 1000, ||delta|| / 5, w = 1.0 * MLP + 1.0; the
    released checkpoint's head is 128 wide with 2 hidden-to-hidden layers (4 Linear layers in all)."""
    cfg = SchedulerConfig()
    assert (cfg.hidden_size, cfg.output_size, cfg.n_layers) == (128, 1, 2)
    assert (cfg.t_embed_dim, cfg.delta_embed_dim, cfg.lambda_embed_dim, cfg.input_size) == (4, 4, 4, 12)
    assert (cfg.t_embed_normalization, cfg.delta_embed_normalization) == (1000.0, 5.0)
    assert (cfg.w_bias, cfg.w_scale) == (1.0, 1.0)
    assert cfg.layer_shapes() == [(128, 12), (128, 128), (128, 128), (1, 128)]
    assert cfg.layer_names() == ["combined_head.0", "combined_head.2", "combined_head.4", "combined_head.6"]
    # a checkpoint configuration that omits entries gets the same defaults
    assert SchedulerConfig.from_dict({}) == cfg


def test_config_is_immutable_so_shared_schedulers_cannot_be_changed():
    """Model clones share one scheduler (``__deepcopy__`` returns it), so its configuration must not be writable."""
    cfg = SchedulerConfig(hidden_size=8, n_layers=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 16  # type: ignore[misc]
    sched = constant_scheduler(2.0, cfg)
    assert copy.deepcopy(sched) is sched
    assert hash(cfg) == hash(SchedulerConfig(hidden_size=8, n_layers=0))


@pytest.mark.parametrize("name", ["hidden_size", "output_size", "t_embed_dim", "delta_embed_dim",
                                  "lambda_embed_dim"])
@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_sizes_must_be_positive_integers(name, bad):
    with pytest.raises(SchedulerFileError, match=f"{name} must be a positive integer"):
        SchedulerConfig.from_dict({name: bad})


@pytest.mark.parametrize("bad", [-1, -2, 1.5])
def test_n_layers_must_be_a_non_negative_integer(bad):
    with pytest.raises(SchedulerFileError, match="n_layers must be >= 0"):
        SchedulerConfig.from_dict({"n_layers": bad})


def test_zero_hidden_layers_is_a_valid_two_linear_head():
    cfg = SchedulerConfig.from_dict({"hidden_size": 8, "n_layers": 0})
    assert cfg.n_layers == 0 and cfg.layer_shapes() == [(8, 12), (1, 8)]
    sched = constant_scheduler(4.5, cfg)
    out = sched(500.0, 0.4, torch.zeros(2, 3), torch.ones(2, 3))
    assert out.tolist() == [4.5, 4.5]


def test_non_finite_weights_are_refused_even_with_finite_biases():
    cfg = SchedulerConfig(hidden_size=4, n_layers=0)
    good = constant_scheduler(3.0, cfg).state_dict()
    for key in ("combined_head.0.weight", "combined_head.2.bias"):
        bad = {k: v.clone() for k, v in good.items()}
        bad[key].view(-1)[0] = float("nan")
        with pytest.raises(SchedulerFileError, match="NaN or infinity"):
            GuidanceScheduler(cfg, bad)


# --- the scheduler --------------------------------------------------------------------------------------------


def test_constant_scheduler_output_is_exactly_w():
    """'exactly w for every input': the sampler compares it to the model's CFG scale bit for bit."""
    eu, ec = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    for w in (0.1, 0.001, 0.3, 0.7, 7.5):
        out = constant_scheduler(w)(123.0, 0.4, eu, ec)
        assert out.dtype == torch.float32
        assert torch.equal(out, torch.full((3,), w, dtype=torch.float32)), (w, out)


def test_constant_scheduler_undoes_the_final_affine():
    """w = w_scale * MLP + w_bias, so the last bias must be (w - w_bias) / w_scale."""
    cfg = SchedulerConfig(hidden_size=4, n_layers=0, w_bias=1.0, w_scale=2.0)
    sched = constant_scheduler(3.0, cfg)
    assert float(sched.state_dict()["combined_head.2.bias"]) == 1.0
    assert sched(10.0, 0.5, torch.zeros(1, 4), torch.ones(1, 4)).tolist() == [3.0]


def test_per_image_timesteps_and_lambdas_match_one_image_at_a_time():
    """Like the authors' ScalarMLP, timestep and lambda may be scalars or one value per image."""
    sched = random_scheduler(SchedulerConfig(hidden_size=16, n_layers=1, w_bias=2.0, w_scale=5.0), seed=2)
    g = torch.Generator().manual_seed(0)
    eu, ec = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    ts, lams = torch.tensor([900.0, 500.0, 20.0]), torch.tensor([0.0, 0.4, 1.0])
    batched = sched(ts, lams, eu, ec)
    one_by_one = torch.cat([sched(float(ts[i]), float(lams[i]), eu[i:i + 1], ec[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, one_by_one)
    assert len(set(batched.tolist())) == 3


# --- file format ----------------------------------------------------------------------------------------------


def _metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        return f.metadata()


def test_saved_file_records_config_format_and_source_only_when_given(tmp_path):
    sched = constant_scheduler(2.5, SchedulerConfig(hidden_size=4, n_layers=0, w_bias=0.5, w_scale=2.0))
    save_scheduler(sched, tmp_path / "with.safetensors", source="checkpoint.pt")
    save_scheduler(sched, tmp_path / "without.safetensors")
    with_src, without = _metadata(tmp_path / "with.safetensors"), _metadata(tmp_path / "without.safetensors")
    assert with_src["source"] == "checkpoint.pt"
    assert "source" not in without
    for meta in (with_src, without):
        assert meta["format"] == "preprint.annealing_guidance.v1"
        assert json.loads(meta["config"])["w_scale"] == 2.0
    assert load_scheduler(tmp_path / "without.safetensors")(1.0, 0.0, torch.zeros(1, 2), torch.ones(1, 2)).tolist() \
        == [2.5]


def test_config_metadata_that_is_not_json_gives_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "badjson.safetensors"
    save_file(constant_scheduler(2.0).state_dict(), str(p), metadata={"config": "{hidden_size: 8"})
    with pytest.raises(SchedulerFileError, match="'config' metadata is not JSON"):
        load_scheduler(p)


# --- the sampler ----------------------------------------------------------------------------------------------

COND_GAIN, UNCOND_GAIN, UNCOND_SHIFT = 0.5, 0.2, 0.1


def toy_predict(scale: float, seen: list | None = None):
    """Linear 'denoisers' D_c = 0.5 x, D_u = 0.2 x + 0.1 and their CFG combination at ``scale``."""

    def predict(x, sigma):
        if seen is not None:
            seen.append(sigma.clone())
        c, u = COND_GAIN * x, UNCOND_GAIN * x + UNCOND_SHIFT
        return GuidedPrediction(u + (c - u) * scale, c, u, scale)

    return predict


def ddim_replay(x: torch.Tensor, sigmas: list[float], scale: float) -> torch.Tensor:
    """Plain-CFG DDIM on the EPS axis, guided re-noising: x' = D + sigma' (x - D) / sigma; the last step returns D."""
    for s, sn in zip(sigmas[:-1], sigmas[1:], strict=True):
        c, u = COND_GAIN * x, UNCOND_GAIN * x + UNCOND_SHIFT
        d = u + (c - u) * scale
        x = d if sn == 0.0 else d + (x - d) / s * sn
    return x


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_lambda_bounds_are_inclusive(lam):
    """lambda lies in [0, 1]: both ends are valid settings and sample normally."""
    x = torch.linspace(-1, 1, 8, dtype=torch.float64).reshape(2, 4)
    sigmas = [3.0, 0.5, 0.0]
    out = sample_annealing_guidance(toy_predict(3.0), x.clone(), torch.tensor(sigmas, dtype=torch.float64),
                                    scheduler=constant_scheduler(3.0), guidance_lambda=lam, timestep_of=lambda s: 999.0,
                                    renoise="guided", disable=True)
    torch.testing.assert_close(out, ddim_replay(x, sigmas, 3.0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("lam", [-0.5, -1e-6, 1.000001])
def test_lambda_outside_the_unit_interval_is_refused(lam):
    with pytest.raises(ValueError, match=r"lambda must lie in \[0, 1\]"):
        sample_annealing_guidance(toy_predict(3.0), torch.zeros(1, 4), torch.tensor([1.0, 0.0]),
                                  scheduler=constant_scheduler(3.0), guidance_lambda=lam, timestep_of=float)


def test_a_step_landing_on_sigma_one_renoises_like_any_other():
    """Only the final sigma 0 returns the guided prediction; an intermediate sigma of exactly 1.0 is an ordinary
    DDIM step."""
    x = torch.linspace(-2, 2, 12, dtype=torch.float64).reshape(3, 4)
    sigmas = [4.0, 1.0, 0.25, 0.0]
    out = sample_annealing_guidance(toy_predict(2.0), x.clone(), torch.tensor(sigmas, dtype=torch.float64),
                                    scheduler=constant_scheduler(2.0), guidance_lambda=0.4, timestep_of=lambda s: 500.0,
                                    renoise="guided", disable=True)
    torch.testing.assert_close(out, ddim_replay(x, sigmas, 2.0), rtol=0, atol=1e-12)


def test_model_gets_one_sigma_per_image():
    """The k-diffusion convention: the model is called with sigma * ones(batch)."""
    seen: list = []
    x = torch.zeros(2, 5, 3)  # batch 2, 5 channels: a per-channel sigma would have 5 entries
    sample_annealing_guidance(toy_predict(2.0, seen), x, torch.tensor([2.0, 0.5, 0.0]),
                              scheduler=constant_scheduler(2.0), guidance_lambda=0.4, timestep_of=lambda s: 1.0,
                              disable=True)
    assert [s.tolist() for s in seen] == [[2.0, 2.0], [0.5, 0.5]]


def test_sampling_builds_no_autograd_graph():
    """Inference only: even a differentiable model and start leave no graph behind (no memory kept for it)."""
    gain = torch.tensor(0.5, requires_grad=True)

    def predict(x, sigma):
        c, u = gain * x, 0.2 * x
        return GuidedPrediction(u + (c - u) * 2.0, c, u, 2.0)

    x = torch.ones(1, 4, requires_grad=True)
    out = sample_annealing_guidance(predict, x, torch.tensor([2.0, 0.5, 0.0]), scheduler=constant_scheduler(2.0),
                                    guidance_lambda=0.4, timestep_of=lambda s: 1.0, disable=True)
    assert not out.requires_grad and out.grad_fn is None


def test_options_after_sigmas_are_keyword_only():
    with pytest.raises(TypeError):
        sample_annealing_guidance(toy_predict(2.0), torch.zeros(1, 4), torch.tensor([1.0, 0.0]),
                                  constant_scheduler(2.0), 0.4, float)  # type: ignore[misc]


def test_timestep_from_noise_level_maps_the_unit_interval_onto_0_999():
    assert timestep_from_noise_level(1.0) == 999.0
    assert timestep_from_noise_level(0.0) == 0.0
    assert timestep_from_noise_level(0.5) == 499.5
    assert timestep_from_noise_level(0.25) == 249.75
    # clamped: noise levels outside [0, 1] (rounding at the schedule's ends) stay on the model's timestep range
    assert timestep_from_noise_level(-0.5) == 0.0
    assert timestep_from_noise_level(1.5) == 999.0
