"""The shared sampler plumbing: sigma-list validation, progress, callbacks, history and the step loop."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from preprint.samplers import common
from preprint.samplers.common import Evaluation, History, SigmaError, bind_model, check_sigmas, progress, run_steps


@pytest.mark.parametrize("bad, fragment", [
    (torch.tensor([[3.0, 1.0, 0.0]]), "must be a 1-D list, got shape (1, 3)"),
    (torch.tensor(2.0), "must be a 1-D list, got shape ()"),
    (torch.tensor([]), "the sigma list is empty; connect a scheduler with at least 1 step"),
    (torch.tensor([3.0, float("nan"), 0.0]), "sigmas contain NaN or infinity"),
    (torch.tensor([float("inf"), 1.0, 0.0]), "sigmas contain NaN or infinity"),
    (torch.tensor([1.0, -0.5]), "sigmas must be >= 0"),
    (torch.tensor([1.0, 2.0]), "sigmas must strictly decrease (noise to clean)"),
    (torch.tensor([1.0, 1.0]), "sigmas must strictly decrease"),
    (torch.tensor([3.0, 1.0, 2.0, 0.0]), "use FlipSigmas or fix the custom list"),
    (torch.tensor([3.0, 2.0, 0.0, 0.0]), "sigmas must strictly decrease"),
])
def test_check_sigmas_rejects_what_cannot_be_integrated(bad, fragment):
    """Each malformed list raises a SigmaError (a ValueError) naming the sampler and what is wrong."""
    with pytest.raises(SigmaError) as info:
        check_sigmas(bad, "MySampler")
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert message.startswith("MySampler: ")
    assert fragment in message, message


def test_check_sigmas_accepts_lists_and_returns_tensors():
    """Plain sequences become tensors; a valid tensor comes back as it is; one sigma is a valid (zero-step) list."""
    out = check_sigmas([2.0, 0.5, 0.0], "S")
    assert isinstance(out, torch.Tensor) and out.tolist() == [2.0, 0.5, 0.0]
    assert isinstance(check_sigmas((1.0, 0.0), "S"), torch.Tensor)
    t = torch.tensor([14.6, 3.0, 0.2, 0.0], dtype=torch.float64)
    assert check_sigmas(t, "S") is t
    one = torch.tensor([0.7])
    assert check_sigmas(one, "S") is one
    assert check_sigmas(torch.tensor([0.0]), "S").tolist() == [0.0]
    with pytest.raises(SigmaError, match="strictly decrease"):
        check_sigmas([0.5, 0.7], "S")


def test_progress_uses_tqdm_when_present_and_a_range_without_it(monkeypatch):
    """``progress`` is tqdm's trange when tqdm imports (the bar ComfyUI shows), a plain range when it does not."""
    pytest.importorskip("tqdm")
    from tqdm.auto import tqdm

    bar = progress(3, disable=True)
    assert isinstance(bar, tqdm)
    assert list(bar) == [0, 1, 2]
    monkeypatch.setattr(common, "_trange", None)
    plain = progress(4, disable=False)
    assert isinstance(plain, range) and list(plain) == [0, 1, 2, 3]


def test_common_imports_without_tqdm(monkeypatch):
    """Without tqdm the module still imports (the maths must not depend on it) and counts steps with a range."""
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    spec = importlib.util.spec_from_file_location("common_without_tqdm", common.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module._trange is None
    assert list(module.progress(2, None)) == [0, 1]


def test_run_steps_hands_the_model_one_sigma_per_batch_row_and_reports_each_step():
    """The model gets ``x`` and a [B] tensor of the step's sigma (dtype of x); the callback gets the state, step,
    sigma and prediction; the step gets the evaluation and its return value is the next state."""
    sigmas = torch.tensor([4.0, 1.5, 0.25, 0.0], dtype=torch.float64)
    x = torch.randn(2, 3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    got_sigma: list[torch.Tensor] = []

    def denoise(xx, s):
        got_sigma.append(s.clone())
        assert xx.shape == x.shape
        return 0.5 * xx

    reports: list[dict] = []
    evals: list[Evaluation] = []

    def step(ev):
        evals.append(ev)
        return ev.x - 1.0

    out = run_steps(denoise, x.clone(), sigmas, step, callback=reports.append, disable=True)
    assert [s.shape for s in got_sigma] == [(2,)] * 3
    assert all(s.dtype == torch.float32 for s in got_sigma)
    assert [s.tolist() for s in got_sigma] == [[4.0, 4.0], [1.5, 1.5], [0.25, 0.25]]
    assert [ev.i for ev in evals] == [0, 1, 2]
    assert [(float(ev.sigma), float(ev.sigma_next)) for ev in evals] == [(4.0, 1.5), (1.5, 0.25), (0.25, 0.0)]
    torch.testing.assert_close(out, x - 3.0)
    assert [r["i"] for r in reports] == [0, 1, 2]
    for k, r in enumerate(reports):
        assert set(r) == {"x", "i", "sigma", "sigma_hat", "denoised"}
        assert float(r["sigma"]) == float(sigmas[k]) and float(r["sigma_hat"]) == float(sigmas[k])
        torch.testing.assert_close(r["x"], x - k)
        torch.testing.assert_close(r["denoised"], 0.5 * (x - k))
        assert r["x"] is evals[k].x and r["denoised"] is evals[k].denoised


def test_run_steps_corrects_before_reporting_and_stepping():
    """``correct(x, denoised)`` revises the state with the new prediction before the callback and the step see it;
    a single sigma is zero steps (no model call, the input comes back)."""
    sigmas = torch.tensor([2.0, 1.0, 0.0])
    x = torch.ones(1, 2)
    seen: list[torch.Tensor] = []
    corrected_with: list[torch.Tensor] = []

    def correct(xx, d):
        corrected_with.append(d)
        return xx + 10.0

    out = run_steps(lambda xx, s: xx * 0 + s[:, None], x.clone(), sigmas, lambda ev: ev.x * 2, disable=True,
                    callback=lambda r: seen.append(r["x"]), correct=correct)
    assert [r.tolist() for r in seen] == [[[11.0, 11.0]], [[32.0, 32.0]]]
    assert [d.tolist() for d in corrected_with] == [[[2.0, 2.0]], [[1.0, 1.0]]]
    assert out.tolist() == [[64.0, 64.0]]
    calls = []
    same = run_steps(lambda xx, s: calls.append(1), x, torch.tensor([3.0]), lambda ev: ev.x + 1, disable=True)
    assert same is x and calls == []


def test_bind_model_passes_extra_args_and_history_keeps_the_newest():
    """``bind_model`` forwards extra_args as keywords (none when None); History keeps the newest ``size`` values,
    oldest first."""
    got = []
    plain = bind_model(lambda x, s, **kw: got.append(kw) or x, None)
    plain(torch.zeros(1), torch.ones(1))
    bound = bind_model(lambda x, s, **kw: got.append(kw) or x, {"cond": 3, "seed": 1})
    bound(torch.zeros(1), torch.ones(1))
    assert got == [{}, {"cond": 3, "seed": 1}]
    h = History(2)
    a, b, c = torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0)
    assert h.push(a) == [a]
    assert h.push(b) == [a, b]
    assert h.push(c) == [b, c] and h.items == [b, c]
