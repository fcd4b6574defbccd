"""The pack loads into real ComfyUI as a custom-node folder, and its first sampler equals core's arithmetic."""

from __future__ import annotations

import asyncio
import inspect
import os
import subprocess
import sys

import comfy.k_diffusion.sampling as k_sampling
import comfy.samplers
import pytest
import torch

import nodes
from preprint.runner.comfy_host import executor_options, server_flags

from .conftest import HYPHENATED_NAME
from .harness import make_conds, run_custom_sampling, run_node, run_sampling, tiny_model


def test_pack_loaded_under_hyphenated_folder_name_without_import_failure(comfy_host):
    assert "PreprintSamplerDPMSolverPP" in comfy_host.pack_node_ids
    assert "PreprintTinyTestModel" in comfy_host.pack_node_ids
    failures = [m for m in comfy_host.boot_log
                if HYPHENATED_NAME in m and ("IMPORT FAILED" in m or "Cannot import" in m)]
    assert failures == []
    for node_id in comfy_host.pack_node_ids:
        assert nodes.NODE_CLASS_MAPPINGS[node_id].RELATIVE_PYTHON_MODULE == f"custom_nodes.{HYPHENATED_NAME}"


def test_every_node_documents_itself(comfy_host):
    for node_id in comfy_host.pack_node_ids:
        info = nodes.NODE_CLASS_MAPPINGS[node_id].GET_NODE_INFO_V1()
        assert node_id.startswith("Preprint")
        assert info["category"].startswith("Preprint/"), node_id
        assert len(info["description"]) > 40, node_id
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert all(info["output_tooltips"]), f"{node_id} has an output without tooltip"


def test_every_node_keeps_a_widget_check_on_every_input(comfy_host):
    """ComfyUI skips its own range and option checks for the inputs a validate_inputs names (for all of them when
    it takes **kwargs), and 0.3.64 checks no V3 combo at all; so every node names its combos and takes no
    **kwargs, and what it names is checked against its own widgets. Its display name is written once (NAME)."""
    from comfy_api.internal import first_real_override

    for node_id in comfy_host.pack_node_ids:
        cls = nodes.NODE_CLASS_MAPPINGS[node_id]
        assert cls.NAME == cls.GET_SCHEMA().display_name, node_id
        info = cls.INPUT_TYPES()
        combos = {k for section in ("required", "optional") for k, v in info.get(section, {}).items()
                  if v[0] == "COMBO"}
        check = first_real_override(cls, "validate_inputs")
        spec = inspect.getfullargspec(check) if check is not None else None
        assert spec is None or spec.varkw is None, f"{node_id}.validate_inputs takes **kwargs"
        named = set(spec.args[1:]) if spec is not None else set()
        assert combos <= named, f"{node_id}: combo(s) {sorted(combos - named)} left unchecked"
        for name in combos:
            message = check(**{name: "no such option"})
            assert isinstance(message, str) and message.startswith(f"{cls.NAME}: {name}"), (node_id, message)


def test_search_aliases_and_advanced_widgets_reach_the_host_that_knows_them(comfy_host):
    """Users search "PAG", "DeepCache", "HiDiffusion": every node declares the words; newer hosts get them in the
    node info (and the window / rescale widgets marked advanced), 0.3.64, which has neither field, builds the
    schemas all the same."""
    import dataclasses

    from comfy_api.latest import io

    knows_aliases = "search_aliases" in {f.name for f in dataclasses.fields(io.Schema)}
    knows_advanced = "advanced" in inspect.signature(io.Float.Input.__init__).parameters
    for node_id in comfy_host.pack_node_ids:
        cls = nodes.NODE_CLASS_MAPPINGS[node_id]
        assert cls.ALIASES, f"{node_id} declares no search aliases"
        info = cls.GET_NODE_INFO_V1()
        assert info.get("search_aliases") == (list(cls.ALIASES) if knows_aliases else None), node_id
    pag = nodes.NODE_CLASS_MAPPINGS["PreprintPerturbedAttentionGuidance"]
    assert "PAG" in pag.ALIASES
    window = pag.INPUT_TYPES()["required"]["sigma_start"][1]
    assert window.get("advanced") is (True if knows_advanced else None)


def test_ksampler_lists_carry_preprint_samplers(comfy_host):
    names = nodes.KSampler.INPUT_TYPES()["required"]["sampler_name"][0]
    assert "preprint_dpmpp_2m" in names and "preprint_dpmpp_3m" in names
    select = nodes.NODE_CLASS_MAPPINGS["KSamplerSelect"]
    spec = select.INPUT_TYPES()["required"]["sampler_name"]
    # a V1 node lists its options as the type; newer releases made KSamplerSelect a V3 node, whose combo carries
    # them in its options
    assert "preprint_dpmpp_2m" in (spec[0] if isinstance(spec[0], list) else spec[1]["options"])
    assert callable(k_sampling.sample_preprint_dpmpp_2m)


@pytest.mark.parametrize("family", ["sd15", "sd15_v"])
def test_dpmpp_2m_node_equals_core_dpmpp_2m(family):
    model = tiny_model(family)
    core = run_sampling(model, family, "dpmpp_2m", "karras", steps=8, cfg=6.0, seed=3)
    (sampler,) = run_node("PreprintSamplerDPMSolverPP", solver="2M", lower_order_final=False)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", 8)
    ours = run_custom_sampling(model, family, sampler, sigmas, cfg=6.0, seed=3)
    # same update in a different but equivalent arrangement: equal up to float32 rounding
    scale = float(core.abs().max())
    assert float((ours - core).abs().max()) <= 1e-5 * max(scale, 1.0)
    via_dropdown = run_sampling(model, family, "preprint_dpmpp_2m", "karras", steps=8, cfg=6.0, seed=3)
    assert float((via_dropdown - core).abs().max()) <= 1e-5 * max(scale, 1.0)


def test_dpmpp_2m_equals_core_in_float64():
    """In double precision the remaining difference is rounding far below 1e-5 in absolute terms."""
    model = tiny_model("sd15", dtype=torch.float64)
    pos, neg = make_conds("sd15")
    pos = [[pos[0][0].double(), pos[0][1]]]
    neg = [[neg[0][0].double(), neg[0][1]]]
    latent = torch.zeros(1, 4, 8, 8, dtype=torch.float64)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ms = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "karras", 6).double()
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(pos, neg)
    guider.set_cfg(5.0)
    core = guider.sample(noise, latent, comfy.samplers.ksampler("dpmpp_2m"), sigmas, seed=5, disable_pbar=True)
    (sampler,) = run_node("PreprintSamplerDPMSolverPP", solver="2M", lower_order_final=False)
    ours = guider.sample(noise, latent, sampler, sigmas, seed=5, disable_pbar=True)
    if core.dtype == torch.float64:
        assert float((ours - core).abs().max()) < 1e-5
    else:  # newer guiders cast the latent to the model's working dtype: float32 rounding, relative
        assert float((ours - core).abs().max()) <= 1e-5 * max(float(core.abs().max()), 1.0)


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux"])
def test_dpmpp_runs_from_both_entry_points_on_every_family(family):
    model = tiny_model(family)
    pos, neg = make_conds(family)
    cfg = 1.0 if family == "flux" else 5.0
    out = run_sampling(model, family, "preprint_dpmpp_3m", "simple", steps=5, cfg=cfg, positive=pos, negative=neg)
    assert torch.isfinite(out).all() and out.shape[1] == (16 if family == "flux" else 4)
    (sampler,) = run_node("PreprintSamplerDPMSolverPP", solver="3M", lower_order_final=True)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 5)
    out2 = run_custom_sampling(model, family, sampler, sigmas, cfg=cfg, positive=pos, negative=neg)
    torch.testing.assert_close(out, out2)


def test_quick_test_for_ci_logs_no_import_failure(comfy_host, tmp_path):
    base = tmp_path / "base"
    (base / "custom_nodes").mkdir(parents=True)
    os.symlink(comfy_host.pack_module.__path__[0], base / "custom_nodes" / HYPHENATED_NAME)
    proc = subprocess.run([sys.executable, "main.py", "--quick-test-for-ci", "--cpu", "--base-directory", str(base),
                           "--database-url", "sqlite:///:memory:", *server_flags(comfy_host.path)],
                          cwd=comfy_host.path, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    lines = [line for line in log.splitlines() if HYPHENATED_NAME in line and "seconds" in line]
    assert lines, "ComfyUI did not report importing the pack:\n" + log[-3000:]
    assert all("IMPORT FAILED" not in line for line in lines), lines


def test_host_boot_adapts_to_the_server_and_executor_signatures(comfy_host):
    """The in-process host passes what this ComfyUI's classes take: on 0.3.64 a classic cache and no asset
    manager; on releases whose PromptExecutor reads cache_args / takes an asset manager, those too."""
    import execution
    import server

    options = executor_options(execution.PromptExecutor, comfy_host.asset_manager)
    takes = inspect.signature(execution.PromptExecutor.__init__).parameters
    assert options["cache_type"] == execution.CacheType.CLASSIC
    assert ("cache_args" in options) == ("cache_args" in takes)
    if "cache_args" in options:
        assert {"ram", "ram_inactive"} <= options["cache_args"].keys()
    with_assets = "asset_manager" in inspect.signature(server.PromptServer.__init__).parameters
    assert (comfy_host.asset_manager is not None) == with_assets
    assert ("--disable-assets" in server_flags(comfy_host.path)) == with_assets

    class NewerExecutor:  # the newest release's signature, to check the detection itself
        def __init__(self, server, cache_type=False, cache_args=None, asset_manager=None):
            pass

    newer = executor_options(NewerExecutor, object())
    assert newer["cache_args"] == {"lru": 0, "ram": 0, "ram_inactive": 0} and "asset_manager" in newer


def test_names_registered_in_on_load_where_the_host_calls_it_and_in_get_node_list_where_it_does_not(
        comfy_host, monkeypatch):
    """Newer ComfyUI awaits ``ComfyExtension.on_load()`` before ``get_node_list()``; 0.3.64 calls only
    ``get_node_list()`` for a custom-node pack. In both orders the sampler and scheduler names are registered,
    once each (on_load already before the node list is asked for), and the same nodes come back."""
    def ours(names):
        return [n for n in names if n.startswith("preprint_")]

    lists = ("KSAMPLER_NAMES", "SAMPLER_NAMES", "SCHEDULER_NAMES")
    expected = {attr: ours(getattr(comfy.samplers, attr)) for attr in lists}
    assert all(expected.values())
    for name in expected["SAMPLER_NAMES"]:  # registering again rebinds these: put the originals back afterwards
        monkeypatch.setattr(k_sampling, f"sample_{name}", getattr(k_sampling, f"sample_{name}"))

    def without_ours():  # ComfyUI's own lists as before the pack loaded (restored by monkeypatch)
        for attr in lists:
            monkeypatch.setattr(comfy.samplers, attr, [n for n in getattr(comfy.samplers, attr)
                                                       if not n.startswith("preprint_")])
        monkeypatch.setattr(comfy.samplers, "SCHEDULER_HANDLERS", {
            k: v for k, v in comfy.samplers.SCHEDULER_HANDLERS.items() if not k.startswith("preprint_")})

    def registered():
        return {attr: ours(getattr(comfy.samplers, attr)) for attr in lists}

    async def newer_host(extension):
        await extension.on_load()
        assert registered() == expected
        return await extension.get_node_list()

    async def host_0_3_64(extension):
        return await extension.get_node_list()

    for load in (newer_host, host_0_3_64):
        without_ours()
        extension = asyncio.run(comfy_host.pack_module.comfy_entrypoint())
        node_list = asyncio.run(load(extension))
        assert registered() == expected, load.__name__
        assert set(expected["SCHEDULER_NAMES"]) <= set(comfy.samplers.SCHEDULER_HANDLERS)
        assert {cls.GET_SCHEMA().node_id for cls in node_list} == set(comfy_host.pack_node_ids)
