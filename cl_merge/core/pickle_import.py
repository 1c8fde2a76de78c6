"""Safe import of pickled checkpoints: whole ``torch.save(model)`` files
(task-vectors / TALL-masks ``ImageEncoder`` objects), Lightning ``.ckpt``
files and pickled state dicts, read without executing anything from them.

``torch.load(weights_only=False)`` would import every class the pickle names
and call whatever its ``__reduce__`` says. Here a restricted unpickler

- maps every global the pickle names to an inert stand-in (nothing is
  imported, so the classes need not be installed: task-vectors'
  ``src.modeling`` is not); a stand-in instance only records the state the
  pickle gives it (``__dict__``, items);
- refuses calls: a ``REDUCE`` on a function (``os.system``, ``eval``, ...) or
  on anything in a system module raises :class:`CheckpointError` before
  anything runs; class constructions the pickle asks for (an enum member
  ``InterpolationMode('bicubic')`` inside a pickled transform) build inert
  records, never the class;
- rebuilds tensors itself from the archive's raw storages (its own versions
  of ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter``, which only
  reinterpret bytes); the only real objects it hands out are containers
  (``OrderedDict``, ``set``), dtypes and those tensors.

The tensors are then named as ``module.state_dict()`` would name them
(walking the recorded ``_parameters``, persistent ``_buffers`` and
``_modules``); a Lightning checkpoint gives its ``state_dict``; a pickled dict
of tensors is taken as is. Anything else where tensors are expected is
refused with the entry's name. Custom ``state_dict`` hooks of the original
classes are not run (they are code), so names are the plain module-tree ones.

Reads torch's zip format (``torch.save`` since 1.6), torch's legacy format
and plain pickles.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch

from cl_merge.errors import CheckpointError

Tensor = torch.Tensor
PathLike = str | os.PathLike

# A call into these modules is never part of a checkpoint's data.
_SYSTEM_MODULES = {
    "builtins", "__builtin__", "os", "posix", "nt", "sys", "subprocess", "shutil", "socket", "importlib", "runpy",
    "ctypes", "pickle", "_pickle", "marshal", "types", "code", "codeop", "pty", "webbrowser", "functools", "operator",
    "io", "_io", "tempfile", "signal", "multiprocessing", "threading", "asyncio", "inspect", "pdb",
    "platform", "glob", "urllib", "http", "requests", "zipimport", "torch.hub", "torch.jit", "torch.ops",
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _Refused(CheckpointError):
    pass


# ---------------------------------------------------------------------- inert stand-ins
class _StandInMeta(type):
    """Calling a stand-in (a REDUCE on it) builds an inert record, or refuses
    when the name is a function or lives in a system module."""

    def __call__(cls, *args, **kwargs):
        if cls._looks_like_code():
            raise _Refused(
                f"the pickle calls {cls._qualname}(...), which would run code; refused without running it "
                "(only tensors, containers and plain objects are imported)"
            )
        obj = cls.__new__(cls)
        object.__setattr__(obj, "_pickle_args", args)
        return obj


class StandIn(metaclass=_StandInMeta):
    """An instance of a class the pickle names (never imported)."""

    _qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        object.__setattr__(obj, "_pickle_args", args)
        object.__setattr__(obj, "_pickle_state", None)
        object.__setattr__(obj, "_pickle_items", {})
        object.__setattr__(obj, "_pickle_list", [])
        return obj

    @classmethod
    def _looks_like_code(cls) -> bool:
        module, _, name = cls._qualname.rpartition(".")
        root = module.split(".")[0]
        return (not name[:1].isupper()) or module in _SYSTEM_MODULES or root in _SYSTEM_MODULES

    # what BUILD, SETITEMS and APPENDS do to an object
    def __setstate__(self, state) -> None:
        object.__setattr__(self, "_pickle_state", state)

    def __setitem__(self, key, value) -> None:
        self._pickle_items[key] = value

    def append(self, value) -> None:
        self._pickle_list.append(value)

    def extend(self, values) -> None:
        self._pickle_list.extend(values)

    @property
    def state_dict_view(self) -> dict:
        """The recorded ``__dict__`` (``(dict_state, slots_state)`` pickles merged)."""
        state = self._pickle_state
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            merged = {}
            for part in state:
                merged.update(part or {})
            return merged
        return state if isinstance(state, dict) else {}

    def __repr__(self) -> str:
        return f"<inert {self._qualname}>"


_STAND_INS: dict[str, type] = {}


class _InertPartial(StandIn):
    """``functools.partial`` objects stored as module attributes (e.g. a norm
    layer factory): recorded, never called."""

    _qualname = "functools.partial"

    @classmethod
    def _looks_like_code(cls) -> bool:
        return False


def _stand_in(module: str, name: str) -> type:
    qualname = f"{module}.{name}"
    cls = _STAND_INS.get(qualname)
    if cls is None:
        cls = _StandInMeta(name, (StandIn,), {"_qualname": qualname, "__module__": "cl_merge.core.pickle_import"})
        _STAND_INS[qualname] = cls
    return cls


# ---------------------------------------------------------------------- storages and tensors
class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _Storage:
    """Raw bytes of one storage, as a uint8 tensor, with the element dtype."""

    def __init__(self, data: Tensor, dtype: torch.dtype):
        self.data = data
        self.dtype = dtype

    def typed(self) -> Tensor:
        size = torch.empty((), dtype=self.dtype).element_size()
        if self.data.numel() % size:
            raise CheckpointError(f"storage of {self.data.numel()} bytes is not a whole number of {self.dtype} values")
        return self.data.view(self.dtype)


_DTYPE_NAMES = {
    "float32", "float", "float64", "double", "float16", "half", "bfloat16", "int64", "long", "int32", "int",
    "int16", "short", "int8", "uint8", "bool", "complex64", "cfloat", "complex128", "cdouble",
}
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8, "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
}


def _rebuild_tensor(storage, storage_offset, size, stride, *rest) -> Tensor:
    if not isinstance(storage, _Storage):
        raise _Refused(f"tensor rebuilt from a {type(storage).__name__}, not from a storage of the archive")
    flat = storage.typed()
    if len(size) and any(s < 0 for s in size):
        raise CheckpointError(f"negative tensor size {tuple(size)}")
    if len(size):
        needed = int(storage_offset) + sum((int(n) - 1) * int(s) for n, s in zip(size, stride) if n > 0) + 1
        if any(n == 0 for n in size):
            needed = 0
        if needed > flat.numel():
            raise CheckpointError(f"tensor of size {tuple(size)} reaches past its storage ({flat.numel()} values)")
    return torch.as_strided(flat, tuple(size), tuple(stride), int(storage_offset))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state) -> Tensor:
    if not isinstance(data, Tensor):
        raise _Refused(f"parameter rebuilt from a {type(data).__name__}, not a tensor")
    return data


def _rebuild_from_type_v2(func, new_type, args, state) -> Tensor:
    if func not in (_rebuild_tensor, _rebuild_parameter):
        raise _Refused("the pickle rebuilds a tensor through a function other than torch's tensor rebuilders")
    return func(*args)


def _reconstructor(cls, base, state):
    """copyreg._reconstructor: ``base.__new__(cls)`` (+ ``base.__init__(obj, state)``) -> an inert instance."""
    if not (isinstance(cls, type) and issubclass(cls, StandIn)):
        raise _Refused(f"copyreg._reconstructor on {cls!r}, which is not a class named by the pickle")
    obj = cls.__new__(cls)
    if state is not None:
        obj.__setstate__(state)
    return obj


def _device(*args):
    return ("device", *args)


def _codecs_encode(text, encoding="latin1"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise _Refused("_codecs.encode with unexpected arguments")
    return text.encode(encoding)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set, ("__builtin__", "set"): set,
    ("builtins", "frozenset"): frozenset, ("__builtin__", "frozenset"): frozenset,
    ("builtins", "complex"): complex, ("__builtin__", "complex"): complex,
    ("builtins", "slice"): slice, ("__builtin__", "slice"): slice,
    ("builtins", "bytearray"): bytearray, ("__builtin__", "bytearray"): bytearray,
    ("copyreg", "_reconstructor"): _reconstructor, ("copy_reg", "_reconstructor"): _reconstructor,
    ("_codecs", "encode"): _codecs_encode,
    ("torch", "device"): _device,
    ("torch", "Size"): tuple,
    ("functools", "partial"): _InertPartial,
    ("torch.storage", "_load_from_bytes"): lambda data: _storage_from_bytes(data),
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, *, source: str, read_storage=None):
        super().__init__(file, encoding="utf-8")
        self._source = source
        self._read_storage = read_storage
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        # protocol-2 pickles name Python 2 modules (``__builtin__``, ``commands``): read them as Python 3 names
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch.storage" and name in ("UntypedStorage", "_LegacyStorage", "TypedStorage"):
            return _StorageType(torch.uint8)
        if module == "torch" and name in _DTYPE_NAMES:
            return getattr(torch, name)  # a dtype is data
        return _stand_in(module, name)

    def persistent_load(self, pid):
        if isinstance(pid, tuple) and len(pid) >= 2 and pid[0] == "module" and isinstance(pid[1], _StandInMeta):
            return pid[1]  # the legacy format records each module class (with its source) this way
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage" or self._read_storage is None:
            raise _Refused(f"unexpected persistent id {str(pid)[:80]!r}")
        storage_type, key, _location, numel = pid[1:5]
        dtype = storage_type.dtype if isinstance(storage_type, _StorageType) else None
        if dtype is None:
            raise _Refused(f"storage of unknown type {storage_type!r}")
        key = str(key)
        if key not in self._storages:
            nbytes = int(numel) * torch.empty((), dtype=dtype).element_size()
            self._storages[key] = _Storage(self._read_storage(key, nbytes), dtype)
        storage = self._storages[key]
        if storage.dtype != dtype:  # the same bytes seen with another dtype
            return _Storage(storage.data, dtype)
        return storage


# ---------------------------------------------------------------------- reading files
def _bytes_tensor(raw: bytes, nbytes: int, what: str) -> Tensor:
    if len(raw) < nbytes:
        raise CheckpointError(f"{what}: storage holds {len(raw)} bytes, needs {nbytes}")
    if not nbytes:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8, count=nbytes)  # one writable copy


def _load_zip(path: Path, archive: zipfile.ZipFile):
    names = archive.namelist()
    records = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if not records:
        raise CheckpointError(f"{path}: a zip file without data.pkl is not a torch checkpoint")
    prefix = records[0][: -len("data.pkl")]
    if f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder").strip() not in (b"little", b""):
        raise CheckpointError(f"{path}: big-endian checkpoints are not supported")

    def read_storage(key: str, nbytes: int) -> Tensor:
        try:
            raw = archive.read(f"{prefix}data/{key}")
        except KeyError:
            raise CheckpointError(f"{path}: storage {key!r} is missing from the archive") from None
        return _bytes_tensor(raw, nbytes, f"{path}: storage {key!r}")

    return _Unpickler(io.BytesIO(archive.read(records[0])), source=str(path), read_storage=read_storage).load()


def _load_legacy_or_plain(path: Path, data: bytes):
    """torch's pre-1.6 format (magic, protocol, sys info, object, storage keys,
    raw storages) or a plain pickle."""
    handle = io.BytesIO(data)
    first = _Unpickler(handle, source=str(path)).load()
    if first != _LEGACY_MAGIC:
        if handle.read(1):
            raise CheckpointError(f"{path}: trailing data after the pickle")
        return first
    _Unpickler(handle, source=str(path)).load()  # protocol version
    _Unpickler(handle, source=str(path)).load()  # sys info
    pending: dict[str, int] = {}

    def read_later(key: str, nbytes: int) -> Tensor:
        pending[key] = nbytes
        return torch.empty(nbytes, dtype=torch.uint8)  # filled below, once the bytes are reached

    unpickler = _Unpickler(handle, source=str(path), read_storage=read_later)
    obj = unpickler.load()
    keys = _Unpickler(handle, source=str(path)).load()
    for key in keys:
        header = handle.read(8)
        if len(header) != 8:
            raise CheckpointError(f"{path}: truncated legacy checkpoint")
        (numel,) = struct.unpack("<q", header)
        storage = unpickler._storages.get(str(key))
        if storage is None:
            raise CheckpointError(f"{path}: storage {key!r} not referenced by the object")
        nbytes = numel * torch.empty((), dtype=storage.dtype).element_size()
        storage.data.copy_(_bytes_tensor(handle.read(nbytes), nbytes, f"{path}: storage {key!r}"))
    return obj


def _load_bytes(data: bytes, source: str):
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return _load_zip(Path(source), archive)
    return _load_legacy_or_plain(Path(source), data)


def _storage_from_bytes(data) -> _Storage:
    """``torch.storage._load_from_bytes``: how ``pickle.dumps(tensor)`` stores a
    storage (a nested torch.save of it), read with the same restrictions."""
    if not isinstance(data, (bytes, bytearray)):
        raise _Refused("torch.storage._load_from_bytes on something other than bytes")
    storage = _load_bytes(bytes(data), "nested storage")
    if not isinstance(storage, _Storage):
        raise _Refused(f"nested storage holds a {_describe(storage)}")
    return storage


def safe_unpickle(path: PathLike):
    """The object graph of a pickled checkpoint, built from inert stand-ins,
    containers and tensors only (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        if zipfile.is_zipfile(path):  # read entry by entry, not the whole file into memory
            with zipfile.ZipFile(path) as archive:
                return _load_zip(path, archive)
        return _load_bytes(path.read_bytes(), str(path))
    except _Refused as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            RuntimeError, zipfile.BadZipFile, struct.error) as exc:
        raise CheckpointError(f"{path}: not a readable pickled checkpoint ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from None


# ---------------------------------------------------------------------- naming the tensors
def _is_module(obj) -> bool:
    return isinstance(obj, StandIn) and isinstance(obj.state_dict_view.get("_parameters"), dict)


def _module_tensors(module: StandIn, prefix: str, out: dict[str, Tensor]) -> None:
    """``module.state_dict()``'s names: own parameters, persistent buffers, then children."""
    state = module.state_dict_view
    for name, value in state.get("_parameters", {}).items():
        if value is not None:
            out[prefix + name] = _tensor_or_refuse(value, prefix + name)
    skipped = state.get("_non_persistent_buffers_set") or set()
    for name, value in (state.get("_buffers") or {}).items():
        if value is not None and name not in skipped:
            out[prefix + name] = _tensor_or_refuse(value, prefix + name)
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not _is_module(child):
            raise CheckpointError(f"submodule {prefix + name!r} is a {_describe(child)}, not a module")
        _module_tensors(child, f"{prefix}{name}.", out)


def _describe(obj) -> str:
    return f"{obj._qualname} object" if isinstance(obj, StandIn) else type(obj).__name__


def _tensor_or_refuse(value, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise CheckpointError(f"entry {name!r} is a {_describe(value)}, not a tensor")
    return value


def _dict_tensors(obj: Mapping, prefix: str, out: dict[str, Tensor]) -> None:
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Tensor):
            out[name] = value
        elif _is_module(value):
            _module_tensors(value, name + ".", out)
        elif isinstance(value, Mapping):
            _dict_tensors(value, name + ".", out)
        else:
            raise CheckpointError(f"entry {name!r} is a {_describe(value)}, not a tensor "
                                  "(only tensors, nested dicts of tensors and modules are imported)")


def extract_state_dict(obj) -> dict[str, Tensor]:
    """Name the tensors of an unpickled checkpoint (a module, a Lightning
    checkpoint, or a dict of tensors) as ``state_dict()`` would."""
    out: dict[str, Tensor] = {}
    if isinstance(obj, StandIn) and not _is_module(obj) and obj._pickle_items:
        obj = obj._pickle_items  # a dict subclass (e.g. Lightning's AttributeDict) pickled by its items
    if _is_module(obj):
        _module_tensors(obj, "", out)
    elif isinstance(obj, Mapping):
        inner = obj.get("state_dict")
        if isinstance(inner, Mapping) or _is_module(inner):
            return extract_state_dict(inner)  # Lightning .ckpt and {'state_dict': ...} wrappers
        _dict_tensors(obj, "", out)
    else:
        raise CheckpointError(f"the pickle holds a {_describe(obj)}, not a module or a state dict")
    if not out:
        raise CheckpointError("the pickle holds no tensors")
    # views into a storage (shared, offset or strided) become tensors of their own
    # (safetensors wants distinct memory); a tensor that is its whole storage is kept as is
    owners: dict[int, int] = {}
    for v in out.values():
        owners[v.untyped_storage().data_ptr()] = owners.get(v.untyped_storage().data_ptr(), 0) + 1

    def own(v: Tensor) -> Tensor:
        whole = (v.is_contiguous() and v.storage_offset() == 0
                 and v.numel() * v.element_size() == v.untyped_storage().nbytes())
        return v.detach() if whole and owners[v.untyped_storage().data_ptr()] == 1 else v.detach().clone()

    return {k: own(v) for k, v in out.items()}


def load_checkpoint_tensors(path: PathLike) -> dict[str, Tensor]:
    """Any checkpoint file or folder as a state dict: safetensors and
    weights-only torch files through :mod:`cl_merge.core.io`; a torch file that
    ``weights_only`` refuses (a pickled module) through the safe importer."""
    from cl_merge.core.io import TORCH_SUFFIXES, load_state_dict

    path = Path(path)
    try:
        return load_state_dict(path)
    except CheckpointError:
        if not path.is_file() or (path.suffix not in TORCH_SUFFIXES and not zipfile.is_zipfile(path)):
            raise
    return import_pickled_checkpoint(path)


def import_pickled_checkpoint(path: PathLike) -> dict[str, Tensor]:
    """Tensors of a pickled checkpoint, named as ``module.state_dict()`` would,
    read without running any code from the file."""
    obj = safe_unpickle(path)
    try:
        return extract_state_dict(obj)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
