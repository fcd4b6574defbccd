"""The sampler-wrapping proxy and helpers (``samplers/wrapping.py``): what a wrapped sampler hands its sampler
function, what the proxy reads through to, when the finish hook runs, and the per-sample sigma helpers."""

from __future__ import annotations

import pytest
import torch

from preprint.samplers.wrapping import DenoiserProxy, bcast, per_sample_sigma, wrap_sampler_function


class Inner:
    """A denoiser with the attributes ComfyUI's samplers reach through (``inner_model``, ``sigmas``)."""

    inner_model = "the inner model"

    def __init__(self):
        self.sigmas = torch.tensor([3.0, 1.0, 0.0])

    def __call__(self, x, sigma, **kw):
        return x * 0 + 7.0


def test_proxy_routes_the_call_and_reads_attributes_through():
    seen = []

    def fn(inner, x, sigma, **kw):
        seen.append((inner, x, sigma, kw))
        return inner(x, sigma) + 1.0

    inner = Inner()
    proxy = DenoiserProxy(inner, fn)
    x, s = torch.zeros(2, 3), torch.tensor([1.0, 1.0])
    assert torch.equal(proxy(x, s, cond_scale=2.0), torch.full((2, 3), 8.0))
    assert seen == [(inner, x, s, {"cond_scale": 2.0})]
    assert proxy.inner_model == "the inner model" and proxy.sigmas is inner.sigmas
    with pytest.raises(AttributeError):
        proxy.missing_attribute  # noqa: B018 - reading it is the test


def test_proxies_stack():
    inner = Inner()
    once = DenoiserProxy(inner, lambda m, x, s, **kw: m(x, s, **kw) * 2)
    twice = DenoiserProxy(once, lambda m, x, s, **kw: m(x, s, **kw) + 1)
    assert torch.equal(twice(torch.zeros(1), torch.ones(1)), torch.tensor([15.0]))
    assert twice.inner_model == "the inner model"


def test_wrapped_sampler_samples_through_a_fresh_proxy_and_finishes_every_run():
    made, finished, got = [], [], []

    def base(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        """Base sampler's doc."""
        got.append((model, extra_args, callback, disable, options))
        return model(x, sigmas[0])

    def make(model, x, sigmas):
        made.append((model, x, sigmas))
        return DenoiserProxy(model, lambda m, xx, s, **kw: m(xx, s) - 1.0)

    f = wrap_sampler_function(base, make, finished.append)
    inner, x, sig = Inner(), torch.zeros(1, 2), torch.tensor([2.0, 0.0])
    out = f(inner, x, sig, extra_args={"a": 1}, callback="cb", disable=True, eta=0.3)
    assert torch.equal(out, torch.full((1, 2), 6.0))
    assert made == [(inner, x, sig)]
    proxy = got[0][0]
    assert isinstance(proxy, DenoiserProxy) and got[0][1:] == ({"a": 1}, "cb", True, {"eta": 0.3})
    assert finished == [proxy]
    f(inner, x, sig)
    assert len(finished) == 2 and finished[1] is not proxy  # one proxy (one state) per run
    assert f.__name__ == "base" and f.__doc__ == "Base sampler's doc."


def test_finish_runs_when_the_sampler_fails_and_is_optional():
    finished = []

    def broken(model, x, sigmas, extra_args=None, callback=None, disable=None):
        raise RuntimeError("interrupted")

    f = wrap_sampler_function(broken, lambda m, x, s: DenoiserProxy(m, lambda *a, **k: None), finished.append)
    with pytest.raises(RuntimeError, match="interrupted"):
        f(Inner(), torch.zeros(1), torch.tensor([1.0, 0.0]))
    assert len(finished) == 1
    g = wrap_sampler_function(lambda model, x, sigmas, **kw: x + 1, lambda m, x, s: DenoiserProxy(m, None))
    assert torch.equal(g(Inner(), torch.zeros(1), torch.tensor([1.0, 0.0])), torch.ones(1))  # no finish hook


def test_wrapped_callable_without_a_name_gets_a_generic_one():
    class Anonymous:
        __doc__ = None

        def __call__(self, model, x, sigmas, **kw):
            return x

    f = wrap_sampler_function(Anonymous(), lambda m, x, s: DenoiserProxy(m, None))
    assert f.__name__ == "sampler" and f.__doc__ is None


@pytest.mark.parametrize("sigma", [2.5, torch.tensor(2.5), torch.tensor([2.5])])
def test_one_sigma_serves_the_whole_batch(sigma):
    x = torch.zeros(3, 4, 5)
    s = per_sample_sigma(sigma, x)
    assert s.shape == (3,) and torch.equal(s, torch.full((3,), 2.5))


def test_per_sample_sigmas_are_kept():
    x = torch.zeros(3, 4, 5)
    sig = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(per_sample_sigma(sig, x), sig)
    assert torch.equal(per_sample_sigma(sig.view(3, 1), x), sig)


@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 4), (2, 3, 4, 5), (2, 1, 3, 4, 5)])
def test_bcast_puts_the_batch_first_and_ones_after(shape):
    x = torch.ones(shape)
    v = torch.tensor([2.0, 3.0])
    b = bcast(v, x)
    assert b.shape == (2,) + (1,) * (len(shape) - 1)
    assert torch.equal((x * b)[1], torch.full(shape[1:], 3.0))
