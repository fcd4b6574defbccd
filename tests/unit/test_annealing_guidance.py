"""Annealing guidance scale: the scheduler MLP, its file format, the converter and the sampler step."""

from __future__ import annotations

import json

import pytest
import torch

from preprint.guidance import annealing
from preprint.guidance.annealing import (
    GuidanceScheduler,
    GuidedPrediction,
    SchedulerConfig,
    SchedulerFileError,
    constant_scheduler,
    load_scheduler,
    sample_annealing_guidance,
    save_scheduler,
)
from preprint.guidance.annealing_convert import convert, infer_config

from .conftest import get_problem

STEPS = 10


def random_scheduler(config: SchedulerConfig, seed: int = 0) -> GuidanceScheduler:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (o, i) in zip(config.layer_names(), config.layer_shapes(), strict=True):
        tensors[f"{name}.weight"] = torch.randn(o, i, generator=g) / i**0.5
        tensors[f"{name}.bias"] = 0.1 * torch.randn(o, generator=g)
    return GuidanceScheduler(config, tensors)


def predictor(kind: str, scale: float):
    base = get_problem(kind, cfg=1.0).model

    def predict(x, sigma):
        c, u = base.cond(x, sigma), base.uncond(x, sigma)
        return GuidedPrediction(u + (c - u) * scale, c, u, scale)

    return predict


def ddim_cfg(kind: str, scale: float, x: torch.Tensor, sigmas: torch.Tensor, renoise: str) -> torch.Tensor:
    """Plain-CFG DDIM written out independently: x' = alpha' D + sigma' (x - alpha D_r) / sigma."""
    base = get_problem(kind, cfg=1.0).model
    for i in range(len(sigmas) - 1):
        s, sn = sigmas[i], sigmas[i + 1]
        c, u = base.cond(x, s), base.uncond(x, s)
        d = u + (c - u) * scale
        if float(sn) == 0.0:
            return d
        r = u if renoise == "uncond" else d
        if kind == "eps":
            x = d + (x - r) / s * sn
        else:
            x = (1 - sn) * d + (x - (1 - s) * r) / s * sn
    return x


@pytest.mark.parametrize("kind,scale", [("eps", 7.5), ("flow", 3.5)])
@pytest.mark.parametrize("renoise", ["guided", "uncond"])
def test_constant_scheduler_reproduces_plain_cfg_exactly(kind, scale, renoise):
    problem = get_problem(kind, cfg=scale)
    sigmas = problem.sigmas(STEPS)
    sched = constant_scheduler(scale)
    out = sample_annealing_guidance(predictor(kind, scale), problem.x_start.clone(), sigmas, scheduler=sched,
                                    guidance_lambda=0.4, timestep_of=lambda s: 999.0 * min(s, 1.0),
                                    parameterisation=kind, renoise=renoise, disable=True)
    ref = ddim_cfg(kind, scale, problem.x_start.clone(), sigmas, renoise)
    assert torch.equal(out, ref)


def test_guided_renoise_is_first_order_accurate_cfg():
    """With re-noising by the guided prediction the sampler is plain DDIM on the CFG ODE: its error to the exact
    CFG solution shrinks about linearly with the step count."""
    problem = get_problem("eps", cfg=3.0)
    errors = []
    for steps in (8, 16):
        sigmas = problem.sigmas(steps)
        out = sample_annealing_guidance(predictor("eps", 3.0), problem.x_start.clone(), sigmas,
                                        scheduler=constant_scheduler(3.0), guidance_lambda=0.4,
                                        timestep_of=lambda s: 999.0, renoise="guided", disable=True)
        errors.append(problem.error(out, sigmas))
    assert errors[1] < 0.75 * errors[0]


def test_scheduler_output_matches_its_definition():
    cfg = SchedulerConfig(hidden_size=16, n_layers=2, w_bias=1.0, w_scale=2.0)
    sched = random_scheduler(cfg)
    g = torch.Generator().manual_seed(3)
    eu, ec = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t, lam = 981.0, 0.4
    w = sched(t, lam, eu, ec)
    # independent evaluation with torch.nn modules
    norm = (eu - ec).reshape(3, -1).norm(dim=1)

    def emb(v, n):
        return torch.stack([v] + [torch.cos(v * k) for k in range(1, n)], dim=1)

    feats = torch.cat([emb(torch.full((3,), t / 1000), 4), emb(norm / 5.0, 4), emb(torch.full((3,), lam), 4)], 1)
    layers = [torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
              torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1)]
    net = torch.nn.Sequential(*layers)
    net.load_state_dict({k.removeprefix("combined_head."): v for k, v in sched.state_dict().items()})
    with torch.no_grad():
        expected = 2.0 * net(feats)[:, 0] + 1.0
    torch.testing.assert_close(w, expected)
    assert w.shape == (3,) and len(set(w.tolist())) == 3  # per image


def test_file_round_trip_and_converter(tmp_path):
    cfg = SchedulerConfig(hidden_size=16, n_layers=1)
    sched = random_scheduler(cfg, seed=4)
    eu, ec = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    # the authors' checkpoint layout: config + weight dictionary, read with the safe loader
    ckpt = {"config": {"guidance_scale_model": {**json.loads(json.dumps(cfg.__dict__))},
                       "diffusion": {"model_id": "stabilityai/stable-diffusion-xl-base-1.0"}},
            "guidance_scale_model": sched.state_dict()}
    src = tmp_path / "checkpoint.pt"
    torch.save(ckpt, src)
    dst = tmp_path / "out" / "annealing.safetensors"
    convert(src, dst)
    loaded = load_scheduler(dst)
    torch.testing.assert_close(loaded(500.0, 0.4, eu, ec), sched(500.0, 0.4, eu, ec))
    # without a configuration the sizes are inferred from the weight shapes
    assert infer_config(sched.state_dict())["hidden_size"] == 16
    save_scheduler(loaded, tmp_path / "again.safetensors")
    torch.testing.assert_close(load_scheduler(tmp_path / "again.safetensors")(10.0, 1.0, eu, ec),
                               sched(10.0, 1.0, eu, ec))


class Executes:
    """Any object whose unpickling would run code: the safe loader must refuse it."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_converter_refuses_pickled_objects(tmp_path):
    src = tmp_path / "evil.pt"
    torch.save({"guidance_scale_model": {}, "payload": Executes()}, src)
    with pytest.raises(SchedulerFileError, match="safe loader"):
        convert(src, tmp_path / "x.safetensors")


def test_missing_and_malformed_files_give_clear_errors(tmp_path):
    with pytest.raises(SchedulerFileError, match="not found.*annealing_convert"):
        load_scheduler(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(SchedulerFileError, match="not a readable safetensors"):
        load_scheduler(junk)
    from safetensors.torch import save_file

    no_cfg = tmp_path / "nocfg.safetensors"
    save_file({"combined_head.0.weight": torch.zeros(2, 12)}, str(no_cfg))
    with pytest.raises(SchedulerFileError, match="no 'config' metadata"):
        load_scheduler(no_cfg)
    wrong = tmp_path / "wrong.safetensors"
    sd = constant_scheduler(5.0).state_dict()
    sd["combined_head.0.weight"] = torch.zeros(3, 12)
    save_file(sd, str(wrong), metadata={"config": json.dumps(constant_scheduler(5.0).config.__dict__)})
    with pytest.raises(SchedulerFileError, match="shape"):
        load_scheduler(wrong)
    missing = tmp_path / "missing.safetensors"
    sd = constant_scheduler(5.0).state_dict()
    del sd["combined_head.2.bias"]
    save_file(sd, str(missing), metadata={"config": json.dumps(constant_scheduler(5.0).config.__dict__)})
    with pytest.raises(SchedulerFileError, match="missing"):
        load_scheduler(missing)
    with pytest.raises(SchedulerFileError, match="checkpoint not found"):
        convert(tmp_path / "none.pt", tmp_path / "o.safetensors")
    with pytest.raises(ValueError, match="lambda"):
        sample_annealing_guidance(predictor("eps", 2.0), torch.zeros(1, 4, 8, 8), torch.tensor([1.0, 0.0]),
                                  scheduler=constant_scheduler(2.0), guidance_lambda=2.0, timestep_of=float)
    assert annealing.RENOISE == ("uncond", "guided")


class RecordingScheduler:
    """Wraps a scheduler and records what the sampler feeds it at every step."""

    def __init__(self, inner: GuidanceScheduler):
        self.inner, self.calls = inner, []

    def __call__(self, timestep, lam, eps_uncond, eps_cond):
        self.calls.append((timestep, lam, eps_uncond.clone(), eps_cond.clone()))
        return self.inner(timestep, lam, eps_uncond, eps_cond)


@pytest.mark.parametrize("kind,scale", [("eps", 7.5), ("flow", 3.5)])
def test_learned_scale_gets_the_timestep_lambda_and_both_noise_predictions(kind, scale):
    """Algorithm 4 of arXiv:2506.24108, replayed independently: at every step the scheduler receives
    t = timestep_of(sigma) of that step, the user's lambda, and the step's noise predictions (eps_u, eps_c) in that
    order, from which it reads the guidance direction ||eps_u - eps_c||; the step then uses the scale w it returns,
    per image, along the direction D_c - D_u: x0 = D_u + w (D_c - D_u), x' = alpha' x0 + sigma' eps_u."""
    base = get_problem(kind, cfg=1.0).model
    problem = get_problem(kind, cfg=scale)
    sigmas = problem.sigmas(STEPS)
    # a non-constant scheduler: w = scale + 10 MLP(features), so t, lambda and the direction's norm all move w
    inner = random_scheduler(SchedulerConfig(hidden_size=16, n_layers=2, w_bias=scale, w_scale=10.0), seed=1)
    recorder = RecordingScheduler(inner)

    def timestep_of(s: float) -> float:  # any strictly monotone map: its value must arrive unchanged
        return 999.0 * s / (1.0 + s)

    lam = 0.3
    out = sample_annealing_guidance(predictor(kind, scale), problem.x_start.clone(), sigmas, scheduler=recorder,
                                    guidance_lambda=lam, timestep_of=timestep_of, parameterisation=kind,
                                    renoise="uncond", disable=True)
    assert len(recorder.calls) == STEPS
    x = problem.x_start.clone()
    scales = []
    for i, (t, got_lam, eu, ec) in enumerate(recorder.calls):
        s, sn = sigmas[i], sigmas[i + 1]
        c, u = base.cond(x, s), base.uncond(x, s)
        a = 1.0 if kind == "eps" else 1.0 - s
        eps_c, eps_u = (x - a * c) / s, (x - a * u) / s
        assert t == timestep_of(float(s)) and got_lam == lam  # exact: plain floats handed through
        # float64 throughout: the replay agrees to rounding (~1e-13 here); a swapped or stale prediction is O(1) off
        torch.testing.assert_close(eu, eps_u, rtol=0, atol=1e-9)
        torch.testing.assert_close(ec, eps_c, rtol=0, atol=1e-9)
        w = inner(t, lam, eps_u, eps_c).double()
        scales.append(w)
        x0 = u + (c - u) * w.reshape(-1, 1, 1, 1)
        x = x0 if float(sn) == 0.0 else (1.0 if kind == "eps" else 1.0 - sn) * x0 + sn * eps_u
    torch.testing.assert_close(out, x, rtol=0, atol=1e-8)
    # teeth: the learned scale moves over the run and between images (spread measured 1.9 for eps, 1.5 for flow), and
    # a wrong input moves it by far more than the tolerances above (lambda 0.3 -> 0.4: up to 0.66 / 0.24; the next
    # step's t: 0.81 / 0.36), so a sampler that fed it another t, lambda or direction would not match the replay
    spread = torch.stack(scales)
    assert float(spread.max() - spread.min()) > 0.5, spread
