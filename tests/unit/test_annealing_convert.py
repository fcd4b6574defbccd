"""The annealing-guidance checkpoint converter: configuration taken from the checkpoint or inferred from the
weight shapes, output folders, the command line (as a module function and as a file run by path)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch

from preprint.guidance import annealing_convert
from preprint.guidance.annealing import GuidanceScheduler, SchedulerConfig, load_scheduler
from preprint.guidance.annealing_convert import convert, infer_config, main, scheduler_from_checkpoint


def weights(config: SchedulerConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (o, i) in zip(config.layer_names(), config.layer_shapes(), strict=True):
        out[f"{name}.weight"] = torch.randn(o, i, generator=g) / i**0.5
        out[f"{name}.bias"] = 0.1 * torch.randn(o, generator=g)
    return out


def probe(sched: GuidanceScheduler) -> torch.Tensor:
    g = torch.Generator().manual_seed(9)
    eu, ec = torch.randn(2, 4, 4, generator=g), torch.randn(2, 4, 4, generator=g)
    return sched(700.0, 0.4, eu, ec)


CFG = SchedulerConfig(hidden_size=16, n_layers=1, w_bias=2.0, w_scale=3.0, delta_embed_normalization=7.0)


def authors_checkpoint(cfg: SchedulerConfig = CFG) -> dict:
    return {"config": {"guidance_scale_model": dict(cfg.__dict__), "diffusion": {"model_id": "sdxl"}},
            "guidance_scale_model": weights(cfg)}


def test_checkpoint_configuration_is_used_including_the_final_affine():
    """The checkpoint's own configuration (w_bias, w_scale, normalisations) wins over shape inference, which
    cannot see them."""
    sched = scheduler_from_checkpoint(authors_checkpoint())
    assert sched.config == CFG
    torch.testing.assert_close(probe(sched), probe(GuidanceScheduler(CFG, weights(CFG))))


@pytest.mark.parametrize("config", [None, [1, 2], {"guidance_scale_model": "oops"}, {"other": {}}])
def test_missing_or_malformed_configuration_falls_back_to_the_weight_shapes(config):
    ckpt = {"guidance_scale_model": weights(CFG)}
    if config is not None:
        ckpt["config"] = config
    sched = scheduler_from_checkpoint(ckpt)
    assert (sched.config.hidden_size, sched.config.n_layers, sched.config.input_size) == (16, 1, 12)
    # the inferred configuration keeps the authors' default affine (w_bias 1, w_scale 1)
    expected = GuidanceScheduler(SchedulerConfig(hidden_size=16, n_layers=1), weights(CFG))
    torch.testing.assert_close(probe(sched), probe(expected))


@pytest.mark.parametrize("n_layers", [0, 1, 3])
def test_infer_config_reads_every_size_from_the_shapes(n_layers):
    cfg = SchedulerConfig(hidden_size=8, n_layers=n_layers)
    got = infer_config(weights(cfg))
    assert got == {"hidden_size": 8, "output_size": 1, "n_layers": n_layers, "t_embed_dim": 4,
                   "delta_embed_dim": 4, "lambda_embed_dim": 4}
    assert all(type(v) is int for v in got.values())


def test_infer_config_splits_the_input_width_in_three():
    cfg = SchedulerConfig(hidden_size=6, n_layers=0, t_embed_dim=3, delta_embed_dim=3, lambda_embed_dim=3)
    got = infer_config(weights(cfg))
    assert (got["t_embed_dim"], got["delta_embed_dim"], got["lambda_embed_dim"]) == (3, 3, 3)
    sched = scheduler_from_checkpoint({"guidance_scale_model": weights(cfg)})
    assert sched.config.input_size == 9


@pytest.mark.parametrize("width", [8, 10])
def test_infer_config_refuses_a_width_not_divisible_by_three(width):
    w = {"combined_head.0.weight": torch.zeros(4, width), "combined_head.2.weight": torch.zeros(1, 4)}
    with pytest.raises(annealing_convert.SchedulerFileError, match=f"input width of {width}"):
        infer_config(w)


def test_infer_config_ignores_unrelated_weights_and_needs_two_linear_layers():
    w = weights(SchedulerConfig(hidden_size=8, n_layers=0))
    w["text_encoder.weight"] = torch.zeros(3, 3)
    assert infer_config(w)["n_layers"] == 0
    single = {"combined_head.0.weight": torch.zeros(1, 12), "combined_head.0.bias": torch.zeros(1)}
    with pytest.raises(annealing_convert.SchedulerFileError, match="do not contain a 'combined_head' MLP"):
        infer_config(single)


def test_convert_creates_missing_folders_and_overwrites_into_existing_ones(tmp_path):
    src = tmp_path / "checkpoint.pt"
    torch.save(authors_checkpoint(), src)
    nested = tmp_path / "models" / "guidance_schedulers" / "annealing.safetensors"
    convert(src, nested)
    flat = tmp_path / "annealing.safetensors"  # its folder exists already
    convert(src, flat)
    for p in (nested, flat):
        torch.testing.assert_close(probe(load_scheduler(p)), probe(GuidanceScheduler(CFG, weights(CFG))))


def test_main_returns_an_exit_status(tmp_path, caplog):
    src = tmp_path / "checkpoint.pt"
    torch.save(authors_checkpoint(), src)
    assert main([str(src), str(tmp_path / "out.safetensors")]) == 0
    assert main([str(tmp_path / "absent.pt"), str(tmp_path / "x.safetensors")]) == 1
    assert "checkpoint not found" in caplog.text


def test_the_script_runs_by_path_outside_any_package(tmp_path, monkeypatch):
    """'python <pack>/guidance/annealing_convert.py checkpoint.pt out.safetensors': run as a plain file (no
    package), the script loads its pack from its own location and exits with status 0."""
    src = tmp_path / "checkpoint.pt"
    torch.save(authors_checkpoint(), src)
    dst = tmp_path / "out.safetensors"
    script = Path(annealing_convert.__file__).resolve()
    monkeypatch.setattr(sys, "argv", [str(script), str(src), str(dst)])
    saved = {k: v for k, v in sys.modules.items() if k == "preprint" or k.startswith("preprint.")}
    for k in saved:  # a fresh interpreter has none of the pack loaded
        del sys.modules[k]
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(script), run_name="__main__")
        pack_file = sys.modules["preprint"].__file__
        converter_file = sys.modules["preprint.guidance.annealing_convert"].__file__
    finally:
        for k in [k for k in sys.modules if k == "preprint" or k.startswith("preprint.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    assert exit_info.value.code == 0
    # the pack (and the converter that ran) came from the script's own folder, not from elsewhere on the path
    assert Path(pack_file).resolve() == script.parents[1] / "__init__.py"
    assert Path(converter_file).resolve() == script
    torch.testing.assert_close(probe(load_scheduler(dst)), probe(GuidanceScheduler(CFG, weights(CFG))))
