"""Checkpoint I/O: safetensors first, atomic writes, lazy per-tensor reads.

Nothing here executes code from a file: safetensors is a plain header plus
raw bytes, and ``.pt``/``.pth``/``.bin`` files are read with
``torch.load(weights_only=True)`` only (a pickle that would build arbitrary
objects is refused with a ``CheckpointError``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cl_merge.errors import CheckpointError, DiskFullError

PathLike = str | os.PathLike
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
INDEX_SUFFIX = ".index.json"


# ----------------------------------------------------------------- atomic writes
TEMP_MARK = ".tmp"  # temp names: ".<name>.<8 random>.tmp[<suffix>]" (mkstemp), beside the target
_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)?$")


def is_temp_file(name: str) -> bool:
    """Whether ``name`` is one of this module's temp files (left behind only by a killed writer)."""
    return bool(_TEMP_NAME.match(name))


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _make_temp(path: Path, suffix: str) -> tuple[int, str]:
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)


def _publish(tmp: str, path: Path) -> None:
    """Rename the finished temp file over ``path`` with the permissions a plain
    ``open`` would give (0666 minus the umask; ``mkstemp`` makes 0600, and
    some writers replace the file they were given)."""
    with contextlib.suppress(OSError):  # file systems without permissions (some network mounts)
        os.chmod(tmp, 0o666 & ~_current_umask())
    os.replace(tmp, path)


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is "no space left on device" — also
    from writers that wrap the OS error (torch's zip writer, safetensors)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _raise_if_disk_full(exc: BaseException, path: Path) -> None:
    if disk_full(exc):
        raise DiskFullError(f"{path}: no space left on device") from None


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temp file beside ``path``; on success fsync and rename over it.

    On any exception the temp file is removed and ``path`` is untouched, so a
    killed process never leaves a half-written artifact under the final name.
    A full disk raises ``DiskFullError`` ("<path>: no space left on device").
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _make_temp(path, TEMP_MARK)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        _publish(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        _raise_if_disk_full(exc, path)
        raise


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path`` for writers that want a file name
    (matplotlib, safetensors); rename it over ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _make_temp(path, TEMP_MARK + path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        _publish(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        _raise_if_disk_full(exc, path)
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    with atomic_write(path, "w") as handle:
        handle.write(text)


def atomic_write_json(path: PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"corrupt JSON in {path}: {exc}") from None


# ----------------------------------------------------------------- saving
def save_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    path: PathLike,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Save atomically; safetensors unless the suffix is a torch one."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    if path.suffix in TORCH_SUFFIXES:
        with atomic_write(path) as handle:
            torch.save(tensors, handle)
        return path
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=meta)
        except RuntimeError as exc:
            if "share memory" not in str(exc):
                raise
            # tied weights (e.g. shared embeddings): safetensors wants distinct storage
            save_file({k: v.clone() for k, v in tensors.items()}, str(tmp), metadata=meta)
    return path


# ----------------------------------------------------------------- reading
class CheckpointReader:
    """Lazy, per-tensor view of a checkpoint: one safetensors file, a sharded
    safetensors checkpoint (``*.safetensors.index.json`` or a folder holding
    one), or a torch file loaded with ``weights_only=True``.

    ``get(key)`` reads one tensor; nothing else is materialised, so a merge can
    stream over many inputs with about one tensor of each in memory.
    """

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self._handles: dict[Path, Any] = {}
        self._where: dict[str, Path] = {}
        self._tensors: dict[str, torch.Tensor] | None = None
        self.metadata: dict[str, str] = {}
        if not self.path.exists():
            raise CheckpointError(f"checkpoint not found: {self.path}")
        if self.path.is_dir():
            self._open_dir()
        elif self.path.name.endswith(INDEX_SUFFIX):
            self._open_index(self.path)
        elif self.path.suffix in TORCH_SUFFIXES:
            self._tensors = _torch_load_tensors(self.path)
        else:
            self._open_shard(self.path)

    # -- opening
    def _open_dir(self) -> None:
        indexes = sorted(self.path.glob(f"*{INDEX_SUFFIX}"))
        if indexes:
            self._open_index(indexes[0])
            return
        shards = sorted(self.path.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"no *.safetensors or *{INDEX_SUFFIX} in folder {self.path}")
        for shard in shards:
            self._open_shard(shard)

    def _open_index(self, index_path: Path) -> None:
        index = read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: index has no 'weight_map'")
        self.metadata = {str(k): str(v) for k, v in (index.get("metadata") or {}).items()}
        folder = index_path.parent.resolve()
        for shard_name in dict.fromkeys(weight_map.values()):
            shard = (index_path.parent / str(shard_name)).resolve()
            # an index names shards beside it; a path that leaves the folder would read any file
            if Path(str(shard_name)).is_absolute() or not shard.is_relative_to(folder):
                raise CheckpointError(f"{index_path}: shard {shard_name!r} is outside the checkpoint folder {folder}")
            self._open_shard(index_path.parent / str(shard_name), expected=None)
        missing = [k for k in weight_map if k not in self._where]
        if missing:
            raise CheckpointError(
                f"{index_path}: {len(missing)} keys listed in weight_map are in no shard, first: {missing[0]!r}"
            )

    def _open_shard(self, shard: Path, expected=None) -> None:
        if not shard.exists():
            raise CheckpointError(f"shard not found: {shard}")
        try:
            handle = safe_open(str(shard), framework="pt", device="cpu")
            keys = list(handle.keys())
            meta = handle.metadata() or {}
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise CheckpointError(f"corrupt or truncated safetensors file {shard}: {exc}") from None
        self._handles[shard] = handle
        self.metadata.update(meta)
        for key in keys:
            if key in self._where:
                raise CheckpointError(f"key {key!r} appears in two shards: {self._where[key]} and {shard}")
            self._where[key] = shard

    # -- access
    def keys(self) -> list[str]:
        if self._tensors is not None:
            return list(self._tensors)
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in (self._tensors if self._tensors is not None else self._where)

    def __len__(self) -> int:
        return len(self.keys())

    def get(self, key: str) -> torch.Tensor:
        if self._tensors is not None:
            try:
                return self._tensors[key]
            except KeyError:
                raise CheckpointError(f"key {key!r} not in {self.path}") from None
        shard = self._where.get(key)
        if shard is None:
            raise CheckpointError(f"key {key!r} not in {self.path}")
        try:
            return self._handles[shard].get_tensor(key)
        except Exception as exc:
            raise CheckpointError(f"cannot read tensor {key!r} from {shard}: {exc}") from None

    def shape(self, key: str) -> tuple[int, ...]:
        if self._tensors is not None:
            return tuple(self._tensors[key].shape)
        return tuple(self._handles[self._where[key]].get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        if self._tensors is not None:
            return self._tensors[key].dtype
        dtype_name = self._handles[self._where[key]].get_slice(key).get_dtype()
        return _SAFETENSORS_DTYPES[dtype_name]

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {k: self.get(k) for k in self.keys()}

    def close(self) -> None:
        self._handles.clear()
        self._tensors = None

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", torch.float32),
    "F8_E5M2": getattr(torch, "float8_e5m2", torch.float32),
}


def _torch_load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"refusing to load {path}: it holds objects beyond plain tensors, which only an unsafe "
            f"unpickle could build ({first[:160]}); convert it safely with "
            f"`cl-merge convert {path} {path.with_suffix('.safetensors')}`"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"corrupt or truncated checkpoint {path}: {str(exc).splitlines()[0][:200]}") from None
    # Lightning checkpoints and {'state_dict': ...} wrappers
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entry {bad[0]!r} is a {type(obj[bad[0]]).__name__}, not a tensor")
    return dict(obj)


def open_checkpoint(path: PathLike) -> CheckpointReader:
    return CheckpointReader(path)


def load_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """Read a whole checkpoint into a dict (see ``CheckpointReader`` for formats)."""
    with CheckpointReader(path) as reader:
        return reader.to_dict()


def read_metadata(path: PathLike) -> dict[str, str]:
    with CheckpointReader(path) as reader:
        return dict(reader.metadata)
