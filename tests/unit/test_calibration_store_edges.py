"""Saved calibrations, edges (utils/calibration_store.py): file names stay the same from one version to the next (a
saved calibration is found again after an update), the fingerprint reads the values its docstring promises, a
nested folder is created, and one unreadable file does not hide the others from the listing."""

import hashlib
from pathlib import Path

import torch

from preprint.utils import calibration_store as store


def test_file_names_are_a_stable_16_hex_digest_of_the_canonical_key(tmp_path):
    key = {"model": "abc", "cfg": 7.5, "shape": [4, 64, 64]}
    # the format: sha256 of the key as JSON with sorted keys and no spaces, first 16 hex digits. Calibrations
    # saved by an earlier version are found only while this stays the same.
    canonical = b'{"cfg":7.5,"model":"abc","shape":[4,64,64]}'
    assert store.path_for(tmp_path, "dpmv3", key).name == \
        f"dpmv3-{hashlib.sha256(canonical).hexdigest()[:16]}.safetensors"


def test_fingerprint_is_16_hex_digits():
    fp = store.fingerprint([("w", torch.arange(10.0))])
    assert len(fp) == 16 and int(fp, 16) >= 0


def test_fingerprint_reads_1024_evenly_strided_values_of_a_large_tensor():
    # 4096 values: every 4th is read (indices 0, 4, ..., 4092), the others are not
    base = torch.zeros(4096)
    fp = store.fingerprint([("w", base)])
    for read in (0, 4, 2048, 4092):
        changed = base.clone()
        changed[read] = 1.0
        assert store.fingerprint([("w", changed)]) != fp, read
    for skipped in (1, 3, 4091, 4095):
        changed = base.clone()
        changed[skipped] = 1.0
        assert store.fingerprint([("w", changed)]) == fp, skipped


def test_fingerprint_reads_every_value_of_a_small_tensor():
    base = torch.zeros(1500)  # fewer than 2 x 1024 values: the stride is 1, the first 1024 are read
    fp = store.fingerprint([("w", base)])
    for read in (1, 3, 1023):
        changed = base.clone()
        changed[read] = 1.0
        assert store.fingerprint([("w", changed)]) != fp, read
    changed = base.clone()
    changed[1024] = 1.0
    assert store.fingerprint([("w", changed)]) == fp


def test_save_creates_a_nested_folder(tmp_path):
    folder = tmp_path / "models" / "preprint" / "calibrations"
    path = store.save(folder, "oss", {"cfg": 1}, {"x": torch.ones(2)})
    assert path.parent == folder and path.is_file()
    assert store.load(folder, "oss", {"cfg": 1}) is not None


def test_an_unreadable_file_does_not_hide_the_ones_after_it(tmp_path, monkeypatch):
    good = [store.save(tmp_path, "oss", {"cfg": c}, {"x": torch.ones(1)}) for c in (1, 2, 3)]
    bad = tmp_path / "oss-0000000000000000.safetensors"
    bad.write_bytes(b"not a safetensors file")
    real_glob = Path.glob

    def bad_first(self, pattern):  # the directory's order is the file system's: put the unreadable file first
        found = list(real_glob(self, pattern))
        return iter(sorted(found, key=lambda p: p != bad))

    monkeypatch.setattr(Path, "glob", bad_first)
    assert sorted(p for p, _, _ in store.listing(tmp_path, "oss")) == sorted(good)
