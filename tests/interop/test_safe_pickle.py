"""The checkpoint reader never runs code from the file."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from m3ae.interop.official import load_official_checkpoint, read_official_pickle
from m3ae.interop.safe_pickle import Inert, safe_load


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Subprocess:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return subprocess.call, (["touch", str(self.marker)],)


class _Eval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w').write('x')",)


PAYLOADS = [_System, _Subprocess, _Eval]


def _checkpoint_with(payload) -> dict:
    """A plausible checkpoint dict with a payload hidden inside the variant."""
    params = {"params": {"cls_token": np.zeros((1, 1, 8), np.float32)}}
    return {"step": 0, "epoch": 0, "variant": {"m3ae.num_heads": payload}, "state": {"params": params}}


@pytest.mark.parametrize("payload", PAYLOADS)
def test_malicious_pickle_does_not_run(payload, tmp_path):
    marker = tmp_path / "pwned"
    src = tmp_path / "evil.pkl"
    src.write_bytes(pickle.dumps(payload(marker)))
    # Sanity: a plain pickle.load of the same bytes would create the marker.
    if payload is _System:
        assert b"system" in src.read_bytes()
    obj, stubbed = safe_load(src)
    assert isinstance(obj, Inert)  # the "call" was only recorded
    assert not marker.exists()
    with pytest.raises(ValueError, match="refusing .*nothing was run"):
        load_official_checkpoint(src)
    assert not marker.exists()


@pytest.mark.parametrize("payload", PAYLOADS)
def test_payload_inside_a_checkpoint_is_refused(payload, tmp_path):
    marker = tmp_path / "pwned"
    src = tmp_path / "evil_ckpt.pkl"
    src.write_bytes(pickle.dumps(_checkpoint_with(payload(marker))))
    with pytest.raises(ValueError, match="refusing"):
        read_official_pickle(src)
    assert not marker.exists()


def test_plain_pickle_would_have_run_it(tmp_path):
    """Control for the tests above: the payload works when unpickled normally."""
    marker = tmp_path / "pwned"
    code = (f"import pickle,sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"pickle.loads(open({str(tmp_path / 'evil.pkl')!r}, 'rb').read())")
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(_System(marker)))
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert marker.exists()


def test_old_numpy_names_and_protocols(tmp_path):
    """Arrays pickled with protocol 2 (numpy.core.multiarray._reconstruct, old spelling)."""
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    data = pickle.dumps({"w": a, "s": np.float32(2.5)}, protocol=2)
    for new, old in ((b"numpy._core.multiarray", b"numpy.core.multiarray"),):
        data = data.replace(new, old)  # as a numpy<2 writer would have named it
    assert b"numpy.core.multiarray" in data
    obj, stubbed = safe_load(data)
    np.testing.assert_array_equal(obj["w"], a)
    assert float(obj["s"]) == 2.5 and not stubbed
    # Protocol 5 with the new spelling.
    obj, _ = safe_load(pickle.dumps(a.T, protocol=5))
    np.testing.assert_array_equal(obj, a.T)


def test_unknown_classes_become_inert_records(tmp_path):
    import collections

    data = pickle.dumps(collections.Counter(a=1))  # not on the allow-list
    obj, stubbed = safe_load(data)
    assert isinstance(obj, Inert) and "collections.Counter" in stubbed


def test_garbage_file_is_a_clear_error(tmp_path):
    src = tmp_path / "junk.pkl"
    src.write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="cannot read"):
        load_official_checkpoint(src)
    src.write_bytes(pickle.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not an official M3AE/MAE checkpoint"):
        load_official_checkpoint(src)


def test_jax_array_and_frozendict_leaves(monkeypatch):
    """Params stored as jax Arrays inside a FrozenDict (older official runs) become numpy arrays."""
    import types

    from m3ae.interop.official import _plain_tree

    fake = types.ModuleType("fake_jax_array")

    def _reconstruct_array(fun, args, arr_state, aval_state):  # never called by the reader
        raise AssertionError("executed")

    _reconstruct_array.__module__ = "fake_jax_array"
    _reconstruct_array.__qualname__ = "_reconstruct_array"
    fake._reconstruct_array = _reconstruct_array

    class FrozenDict(dict):
        def __reduce__(self):
            return FrozenDict, (dict(self),)

    FrozenDict.__module__ = "fake_jax_array"
    FrozenDict.__qualname__ = "FrozenDict"
    fake.FrozenDict = FrozenDict
    monkeypatch.setitem(sys.modules, "fake_jax_array", fake)

    class JaxArray:
        def __init__(self, a):
            self.a = a

        def __reduce__(self):
            fun, args, state = self.a.__reduce__()
            return _reconstruct_array, (fun, args, state, {"weak_type": False})

    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    data = pickle.dumps({"params": FrozenDict(kernel=JaxArray(a))})
    monkeypatch.delitem(sys.modules, "fake_jax_array")  # the reader must not need it
    obj, stubbed = safe_load(data)
    assert "fake_jax_array._reconstruct_array" in stubbed
    tree = _plain_tree(obj)
    np.testing.assert_array_equal(tree["params"]["kernel"], a)
