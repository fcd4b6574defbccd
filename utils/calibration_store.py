"""Saved calibrations: statistics and schedules computed on the user's own model, stored as safetensors files.

Calibrated samplers (statistics for DPM-Solver-v3, searched step schedules, compensation ratios) are expensive to
compute and valid only for the model, guidance scale and latent shape they were computed with. A calibration is
saved under a key (a dict of plain values: the model's fingerprint, the CFG, the shape, the settings) and found
again by the same key on a later run. Plain torch and the safetensors package; the ComfyUI glue decides the folder.

File layout: ``<folder>/<kind>-<digest of the key>.safetensors``; the key itself and any metadata are stored as JSON
in the file's metadata, so a file can be listed and read without knowing its key, and a digest collision or a
hand-renamed file is caught by comparing the stored key.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

FORMAT = "preprint-calibration-1"
_SAMPLE = 1024  # values read per tensor for a fingerprint: enough to tell fine-tunes apart, fast on a 12 GB model


def _canonical(value) -> str:
    """JSON with sorted keys and floats written exactly, so equal keys give equal digests."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=repr)


def fingerprint(tensors: Iterable[tuple[str, torch.Tensor]], extra: Mapping | None = None) -> str:
    """A short digest of a model's weights: every name, shape and dtype, and up to 1024 values of each tensor
    (evenly strided over the flattened tensor, read in float32). ``extra`` (plain values: LoRA patches and their
    strengths, the model's sampling type, ...) is folded in, because they change what the model computes.

    Two models that differ only in values the strided sample misses get the same fingerprint; fine-tunes and LoRA
    merges change nearly every element, so the sample sees them."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        flat = tensor.detach().reshape(-1)
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        if flat.numel():
            step = max(1, flat.numel() // _SAMPLE)
            sample = flat[::step][:_SAMPLE].to(device="cpu", dtype=torch.float32).contiguous()
            digest.update(sample.numpy().tobytes())
    digest.update(_canonical(dict(extra or {})).encode())
    return digest.hexdigest()[:16]


def key_digest(key: Mapping) -> str:
    return hashlib.sha256(_canonical(dict(key)).encode()).hexdigest()[:16]


def path_for(folder: str | os.PathLike, kind: str, key: Mapping) -> Path:
    if not kind or not kind.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"calibration kind {kind!r} must be letters, digits, '-' or '_'")
    return Path(folder) / f"{kind}-{key_digest(key)}.safetensors"


def save(folder: str | os.PathLike, kind: str, key: Mapping, tensors: Mapping[str, torch.Tensor],
         meta: Mapping | None = None) -> Path:
    """Write a calibration atomically (a temporary file renamed into place, so a crash never leaves half a file
    that a later run would read) and return its path."""
    from safetensors.torch import save_file

    path = path_for(folder, kind, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": FORMAT, "kind": kind, "key": _canonical(dict(key)), "meta": _canonical(dict(meta or {}))}
    tmp = path.with_suffix(".tmp")
    save_file({name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}, str(tmp), metadata=header)
    os.replace(tmp, path)
    return path


def read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(tensors, key, meta) of one calibration file; a clear error naming the file when it is not one."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable calibration file ({error}); delete it and calibrate again") \
            from error
    if header.get("format") != FORMAT:
        raise ValueError(f"{path} is not a calibration file of this pack (format {header.get('format')!r}); "
                         "delete it and calibrate again")
    return tensors, json.loads(header["key"]), json.loads(header["meta"])


def read_header(path: str | os.PathLike) -> tuple[dict, dict]:
    """(key, meta) of one calibration file without reading its tensors (statistics files can be gigabytes)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable calibration file ({error}); delete it and calibrate again") \
            from error
    if header.get("format") != FORMAT:
        raise ValueError(f"{path} is not a calibration file of this pack (format {header.get('format')!r}); "
                         "delete it and calibrate again")
    return json.loads(header["key"]), json.loads(header["meta"])


def load(folder: str | os.PathLike, kind: str, key: Mapping) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The calibration saved under ``key``, as (tensors, meta), or None when there is none. A file found is
    touched, so "the newest calibration" (``listing``) is the one used last, not only the one computed last."""
    path = path_for(folder, kind, key)
    if not path.is_file():
        return None
    tensors, stored_key, meta = read(path)
    if stored_key != json.loads(_canonical(dict(key))):
        return None  # a digest collision or a renamed file: not this key's calibration
    os.utime(path)
    return tensors, meta


def listing(folder: str | os.PathLike, kind: str) -> list[tuple[Path, dict, dict]]:
    """Every readable calibration of one kind in a folder as (path, key, meta), newest (last written or loaded)
    first, from the headers only; unreadable files are skipped here (``read`` names them when asked directly)."""
    found = []
    for path in Path(folder).glob(f"{kind}-*.safetensors"):
        try:
            key, meta = read_header(path)
        except ValueError:
            continue
        found.append((path.stat().st_mtime, path, key, meta))
    found.sort(key=lambda item: item[0], reverse=True)
    return [(path, key, meta) for _, path, key, meta in found]
