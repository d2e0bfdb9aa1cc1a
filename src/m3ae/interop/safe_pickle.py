"""Read pickled checkpoints without running code from them.

``pickle.load`` imports whatever module a file names and calls whatever it is told to, so
a checkpoint can run any command when it is opened. The official JAX checkpoints are
cloudpickled Flax train states: opening them normally needs jax, flax, optax and the
official ``m3ae`` package, and executes their pickled functions. We only want the numpy
arrays inside, so :class:`SafeUnpickler` resolves a short allow-list of harmless
constructors (numpy arrays, dtypes and scalars under both the ``numpy.core`` and
``numpy._core`` spellings, and plain containers) and answers every other global with an
:class:`Inert` stand-in that records what it was given and never calls anything. A
malicious ``__reduce__`` (``os.system``, ``subprocess.run``, ``builtins.eval``...) therefore
yields an inert record instead of a side effect.
"""
from __future__ import annotations

import collections
import io
import pickle
from typing import Any

import numpy as np

# numpy moved its internals from numpy.core to numpy._core in 2.0; files written by either
# version name one or the other, so both spellings map to the functions of the installed numpy.
_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray",
                  "numpy.core.numeric", "numpy._core.numeric")


def _numpy_attr(name: str):
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray", "numpy._core.numeric",
                "numpy.core.numeric"):
        try:
            module = __import__(mod, fromlist=[name])
        except ImportError:
            continue
        if hasattr(module, name):
            return getattr(module, name)
    raise pickle.UnpicklingError(f"this numpy has no {name}")


def _frombuffer(buf, dtype, shape, order):
    # numpy's own _frombuffer returns a read-only view of the pickle's bytes; copy so the
    # arrays are ordinary writable arrays. Object arrays cannot come from a byte buffer.
    if np.dtype(dtype).hasobject:
        raise pickle.UnpicklingError("refusing an object-dtype array")
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order).copy(order="K")


def _latin1_encode(text, encoding="utf-8", errors="strict"):
    # Protocol 2 stores bytes as _codecs.encode(str, "latin1"); allow exactly that use.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is only allowed for latin1 byte strings")
    return text.encode("latin1", errors)


def _allowed(module: str, name: str):
    """The real object for an allow-listed global, or None."""
    if module in _NUMPY_MODULES:
        if name == "_frombuffer":
            return _frombuffer
        if name in ("_reconstruct", "scalar"):
            return _numpy_attr(name)
        return None
    if module == "numpy":
        return {"ndarray": np.ndarray, "dtype": np.dtype}.get(name)
    if module == "builtins":
        return {"set": set, "frozenset": frozenset, "list": list, "dict": dict, "tuple": tuple,
                "complex": complex, "bytearray": bytearray, "slice": slice}.get(name)
    if module in ("_codecs", "codecs") and name == "encode":
        return _latin1_encode
    if module == "collections" and name == "OrderedDict":
        return collections.OrderedDict
    return None


class Inert:
    """Stands in for a class or function the file names but we do not trust.

    Calling it, instantiating it (``NEWOBJ``), or restoring state into it (``BUILD``) only
    records the arguments; attribute reads look into the recorded state, so a Flax train
    state's ``.params`` is found without Flax.
    """

    _qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        object.__setattr__(obj, "_args", args)
        object.__setattr__(obj, "_kwargs", kwargs)
        object.__setattr__(obj, "_state", None)
        object.__setattr__(obj, "_items", {})
        object.__setattr__(obj, "_list", [])
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):  # e.g. getattr(stub, "x")(...) in a pickle
        return _stub(f"{self._qualname}()")(*args, **kwargs)

    def __setstate__(self, state):
        object.__setattr__(self, "_state", state)

    def __setitem__(self, key, value):
        self._items[key] = value

    def append(self, value):
        self._list.append(value)

    def extend(self, values):
        self._list.extend(values)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        state = object.__getattribute__(self, "_state")
        # BUILD state is a dict, or (dict, slots) for objects with __slots__.
        dicts = state if isinstance(state, tuple) else (state,)
        for d in dicts:
            if isinstance(d, dict) and name in d:
                return d[name]
        kwargs = object.__getattribute__(self, "_kwargs")
        if name in kwargs:
            return kwargs[name]
        raise AttributeError(f"inert {self._qualname} has no recorded field {name!r}")

    def __repr__(self):
        return f"<inert {self._qualname}>"


def _stub(qualname: str) -> type:
    return type("Inert", (Inert,), {"_qualname": qualname})


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that never imports or calls anything outside the allow-list."""

    def __init__(self, file, **kwargs):
        # latin1 reads numpy arrays pickled by Python 2 (numpy's own advice); no effect otherwise.
        kwargs.setdefault("encoding", "latin1")
        super().__init__(file, **kwargs)
        self.stubbed: set[str] = set()

    def find_class(self, module: str, name: str):
        obj = _allowed(module, name)
        if obj is not None:
            return obj
        self.stubbed.add(f"{module}.{name}")
        return _stub(f"{module}.{name}")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent references are not supported")


def safe_load(path_or_bytes) -> tuple[Any, set[str]]:
    """Unpickle a file (or bytes) safely. Returns (object, names of globals replaced by stubs)."""
    if isinstance(path_or_bytes, (bytes, bytearray)):
        f = io.BytesIO(path_or_bytes)
        close = False
    else:
        f = open(path_or_bytes, "rb")
        close = True
    try:
        up = SafeUnpickler(f)
        try:
            obj = up.load()
        except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError,
                KeyError, ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read {getattr(f, 'name', 'the pickle')} safely: "
                             f"{type(e).__name__}: {e}") from e
        return obj, up.stubbed
    finally:
        if close:
            f.close()
