"""Capping example graphs for the tiny model (runner/tiny_substitution.py): a capped Tiled Diffusion graph still
tiles (its tiles stay smaller than the capped image, which the node requires), other graphs are capped as asked."""

import json
from pathlib import Path

from preprint.runner.tiny_substitution import substitute_tiny

API = Path(__file__).resolve().parents[2] / "workflows" / "api"


def _tiled():
    return {p.name: json.loads(p.read_text()) for p in sorted(API.glob("*.json"))
            if any(n["class_type"] == "PreprintTiledDiffusion" for n in json.loads(p.read_text()).values())}


def test_capped_tiled_examples_keep_tiles_smaller_than_the_image():
    graphs = _tiled()
    assert len(graphs) >= 2  # the tiling examples exist
    for max_side in (64, 256):
        for name, prompt in graphs.items():
            tiny, _ = substitute_tiny(prompt, max_side=max_side)
            sides = [v for n in tiny.values() if n["class_type"] in ("EmptyLatentImage", "EmptySD3LatentImage")
                     for k, v in n["inputs"].items() if k in ("width", "height")]
            tiles = [n["inputs"] for n in tiny.values() if n["class_type"] == "PreprintTiledDiffusion"]
            assert sides and tiles, name
            for t in tiles:
                assert t["tile_width"] < min(sides) and t["tile_height"] < min(sides), (name, max_side, t, sides)
                assert t["tile_width"] >= 64 and t["tile_width"] % 8 == 0 and t["overlap"] < t["tile_width"]


def test_graphs_without_tiles_are_capped_as_asked():
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x.safetensors"}},
              "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 768, "batch_size": 1}},
              "3": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "latent_image": ["2", 0], "steps": 30}}}
    tiny, _ = substitute_tiny(prompt, max_side=64, max_steps=4)
    assert tiny["2"]["inputs"]["width"] == 64 and tiny["2"]["inputs"]["height"] == 64
    assert tiny["3"]["inputs"]["steps"] == 4
