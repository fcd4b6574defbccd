"""Saved calibrations (utils/calibration_store.py): keys find their own file and nothing else; fingerprints tell
weights apart; files are checked before use."""

import torch

from preprint.utils import calibration_store as store


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(64, 32, generator=g), "b.bias": torch.randn(7, generator=g)}


def test_fingerprint_sees_values_names_shapes_and_extra():
    base = store.fingerprint(_weights().items())
    assert store.fingerprint(_weights().items()) == base
    assert store.fingerprint(reversed(list(_weights().items()))) == base  # order of the state dict is irrelevant
    changed = _weights()
    changed["a.weight"] = changed["a.weight"] * 1.01  # a fine-tune moves every element
    assert store.fingerprint(changed.items()) != base
    renamed = {"c.weight" if k == "a.weight" else k: v for k, v in _weights().items()}
    assert store.fingerprint(renamed.items()) != base
    reshaped = {k: v.reshape(32, 64) if k == "a.weight" else v for k, v in _weights().items()}
    assert store.fingerprint(reshaped.items()) != base
    assert store.fingerprint(_weights().items(), {"lora": 0.5}) != base
    assert store.fingerprint(_weights().items(), {"lora": 0.5}) != store.fingerprint(_weights().items(), {"lora": 1})


def test_save_then_load_by_key_and_only_by_that_key(tmp_path):
    key = {"model": "abc", "cfg": 7.5, "shape": [4, 64, 64]}
    tensors = {"l": torch.arange(6.0).reshape(2, 3), "s": torch.zeros(3)}
    path = store.save(tmp_path, "dpmv3", key, tensors, {"samples": 8})
    assert path.name.startswith("dpmv3-") and path.is_file() and not list(tmp_path.glob("*.tmp"))
    found = store.load(tmp_path, "dpmv3", dict(reversed(list(key.items()))))  # key order is irrelevant
    assert found is not None
    loaded, meta = found
    assert torch.equal(loaded["l"], tensors["l"]) and torch.equal(loaded["s"], tensors["s"]) and meta == {"samples": 8}
    assert store.load(tmp_path, "dpmv3", {**key, "cfg": 7.0}) is None
    assert store.load(tmp_path, "oss", key) is None
    assert [p for p, _, _ in store.listing(tmp_path, "dpmv3")] == [path]


def test_a_renamed_file_is_not_taken_for_another_key(tmp_path):
    first = store.save(tmp_path, "oss", {"cfg": 1}, {"x": torch.ones(1)})
    other = store.path_for(tmp_path, "oss", {"cfg": 2})
    first.rename(other)
    assert store.load(tmp_path, "oss", {"cfg": 2}) is None


def test_a_corrupt_file_is_named_in_the_error(tmp_path):
    path = store.path_for(tmp_path, "oss", {"cfg": 1})
    path.write_bytes(b"not a safetensors file")
    try:
        store.load(tmp_path, "oss", {"cfg": 1})
    except ValueError as error:
        assert str(path) in str(error) and "calibrate again" in str(error)
    else:
        raise AssertionError("a corrupt calibration file was read")
    assert store.listing(tmp_path, "oss") == []


def test_bad_kind_is_refused(tmp_path):
    for kind in ("", "a/b", "../x"):
        try:
            store.path_for(tmp_path, kind, {})
        except ValueError:
            continue
        raise AssertionError(kind)


def test_listing_reads_headers_and_a_loaded_file_becomes_the_newest(tmp_path):
    import os

    a = store.save(tmp_path, "oss", {"cfg": 7}, {"x": torch.ones(2)})
    b = store.save(tmp_path, "oss", {"cfg": 4}, {"x": torch.zeros(2)})
    os.utime(a, (1, 1))
    os.utime(b, (2, 2))
    assert [p for p, _, _ in store.listing(tmp_path, "oss")] == [b, a]
    assert store.read_header(a) == ({"cfg": 7}, {})
    store.load(tmp_path, "oss", {"cfg": 7})  # used again: the newest now
    assert [p for p, _, _ in store.listing(tmp_path, "oss")] == [a, b]
