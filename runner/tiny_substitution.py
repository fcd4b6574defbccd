"""Swap a workflow's model loaders for the tiny untrained test model, so a graph runs without weights."""

from __future__ import annotations

import copy

# loader class -> {its output slot: PreprintTinyTestModel output slot (0 MODEL, 1 CLIP, 2 VAE)}
LOADER_OUTPUTS: dict[str, dict[int, int]] = {
    "CheckpointLoaderSimple": {0: 0, 1: 1, 2: 2},
    "UNETLoader": {0: 0},
    "DualCLIPLoader": {0: 1},
    "CLIPLoader": {0: 1},
    "VAELoader": {0: 2},
}
# loader class -> (file input, ComfyUI models folder)
LOADER_FILES: dict[str, list[tuple[str, str]]] = {
    "CheckpointLoaderSimple": [("ckpt_name", "checkpoints")],
    "UNETLoader": [("unet_name", "diffusion_models")],
    "DualCLIPLoader": [("clip_name1", "text_encoders"), ("clip_name2", "text_encoders")],
    "CLIPLoader": [("clip_name", "text_encoders")],
    "VAELoader": [("vae_name", "vae")],
}
LATENT_NODES = ("EmptyLatentImage", "EmptySD3LatentImage")
MIN_TILE = 64  # the Tiled Diffusion node's smallest tile side, px


def guess_architecture(prompt: dict) -> str:
    """The tiny architecture matching a workflow's loaders: flux, sd3, sdxl or sd15."""
    for node in prompt.values():
        ctype, inputs = node.get("class_type"), node.get("inputs", {})
        if ctype == "UNETLoader" or (ctype in ("DualCLIPLoader", "CLIPLoader") and inputs.get("type") == "flux"):
            return "flux"
        if ctype == "EmptySD3LatentImage" or ctype == "FluxGuidance":
            return "flux"
    for node in prompt.values():
        ckpt = str(node.get("inputs", {}).get("ckpt_name", "")).lower()
        if node.get("class_type") == "CheckpointLoaderSimple" and "flux" in ckpt:
            return "flux"
        if node.get("class_type") == "CheckpointLoaderSimple" and "sd3" in ckpt:
            return "sd3"
        if node.get("class_type") == "CheckpointLoaderSimple" and "xl" in ckpt:
            return "sdxl"
    return "sd15"


def loader_nodes(prompt: dict) -> list[str]:
    return [nid for nid, n in prompt.items() if n.get("class_type") in LOADER_OUTPUTS]


def substitute_tiny(prompt: dict, architecture: str | None = None, max_side: int | None = 256,
                    max_steps: int | None = None) -> tuple[dict, str]:
    """A copy of ``prompt`` whose loaders are replaced by one PreprintTinyTestModel node.

    Latent sizes are capped at ``max_side`` pixels (at least 128 in a Tiled Diffusion graph, whose tiles shrink to
    at most half of it) and, when given, sampler steps at ``max_steps``: the tiny model proves that the graph runs,
    so there is no point in paying for full-size work.
    """
    prompt = copy.deepcopy(prompt)
    arch = architecture or guess_architecture(prompt)
    loaders = loader_nodes(prompt)
    if not loaders:
        return prompt, arch
    numeric = [int(k) for k in prompt if str(k).isdigit()]
    tiny_id = str(max(numeric, default=0) + 1)
    for node in prompt.values():
        for name, value in node.get("inputs", {}).items():
            if isinstance(value, list) and len(value) == 2 and value[0] in loaders:
                slot_map = LOADER_OUTPUTS[prompt[value[0]]["class_type"]]
                node["inputs"][name] = [tiny_id, slot_map[value[1]]]
    for nid in loaders:
        del prompt[nid]
    prompt[tiny_id] = {"class_type": "PreprintTinyTestModel", "inputs": {"architecture": arch, "weights_seed": 0},
                       "_meta": {"title": "Tiny untrained test model"}}
    tiled = any(n.get("class_type") == "PreprintTiledDiffusion" for n in prompt.values())
    if tiled and max_side is not None:
        # a tile larger than the image is an error, so a capped tiled graph keeps room for two of the smallest
        # tiles (64 px) and its tiles shrink with the image: it still tiles, as the full-size graph does
        max_side = max(max_side, 2 * MIN_TILE)
        for node in prompt.values():
            if node.get("class_type") == "PreprintTiledDiffusion":
                inputs = node["inputs"]
                tile = max(MIN_TILE, (max_side // 2) // 8 * 8)
                for key in ("tile_width", "tile_height"):
                    if isinstance(inputs.get(key), int):
                        inputs[key] = min(inputs[key], tile)
                if isinstance(inputs.get("overlap"), int):
                    inputs["overlap"] = min(inputs["overlap"], tile // 4 // 8 * 8)
    for node in prompt.values():
        inputs = node.get("inputs", {})
        if max_side is not None and node.get("class_type") in LATENT_NODES:
            for key in ("width", "height"):
                if isinstance(inputs.get(key), int) and inputs[key] > max_side:
                    inputs[key] = max_side
        if max_steps is not None and isinstance(inputs.get("steps"), int) and inputs["steps"] > max_steps:
            inputs["steps"] = max_steps
    return prompt, arch


def missing_model_files(prompt: dict) -> list[tuple[str, str, str, str]]:
    """(node id, loader, file, folder) for every loader input naming a file that is not installed."""
    import folder_paths

    missing = []
    for nid, node in prompt.items():
        for input_name, folder in LOADER_FILES.get(node.get("class_type"), []):
            name = node.get("inputs", {}).get(input_name)
            if isinstance(name, str) and name not in folder_paths.get_filename_list(folder):
                missing.append((nid, node["class_type"], name, folder))
    return missing


def nothing_installed(folders: set[str]) -> bool:
    import folder_paths

    return all(not folder_paths.get_filename_list(f) for f in folders)
