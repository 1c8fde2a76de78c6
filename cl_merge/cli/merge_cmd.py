"""``cl-merge merge``: merge checkpoints on disk with any registered strategy.

Inputs are read lazily (one tensor per model at a time, see
``cl_merge.core.io.CheckpointReader``), so memory stays near one model
(the merged result) whatever the number of inputs. Outputs are written
atomically: on any error nothing appears under the output names.

    cl-merge merge --pretrained P --finetuned A B C --method ties \\
        --set density=0.2 scaling=0.3 --out merged.safetensors
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from cl_merge.errors import CheckpointError, ConfigError, MergeInputError

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pretrained", required=True, metavar="PATH",
                        help="pretrained checkpoint: .safetensors file, sharded *.safetensors.index.json, "
                             "a folder of shards, or a .pt/.pth/.bin state dict (loaded without running code)")
    parser.add_argument("--finetuned", required=True, nargs="+", metavar="PATH",
                        help="fine-tuned checkpoints (same keys and shapes as --pretrained)")
    parser.add_argument("--method", default="task_arithmetic", help="merging strategy (see `cl-merge methods`)")
    parser.add_argument("--set", dest="hparams", nargs="+", action="extend", default=[], metavar="NAME=VALUE",
                        help="strategy hyperparameters, values parsed as YAML (density=0.2 scaling=0.3)")
    parser.add_argument("--out", required=True, metavar="PATH",
                        help="output .safetensors (or .pt); per-task strategies also write OUT_task{i}")
    parser.add_argument("--include", nargs="+", action="extend", default=None, metavar="PAT",
                        help="merge only entries matching these globs ('re:' prefix for regexes)")
    parser.add_argument("--exclude", nargs="+", action="extend", default=[], metavar="PAT",
                        help="do not merge entries matching these patterns (they are copied from --pretrained)")
    parser.add_argument("--task-vectors", action="store_true",
                        help="--finetuned files are task vectors (θ_t − θ0), e.g. written by TaskVector.save")
    parser.add_argument("--no-check-finite", action="store_true", help="skip the NaN/Inf checks of the inputs")
    parser.add_argument("--max-shard-size", default=None, metavar="SIZE",
                        help="write sharded safetensors with an index json, shards of at most SIZE (e.g. 2GB, 500MB)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--device", default=None, metavar="DEV",
                        help="where the arithmetic runs, e.g. cuda or cuda:1 (one tensor at a time; inputs stream "
                             "from disk, results come back to the CPU, so models larger than GPU memory merge)")


# ----------------------------------------------------------------- argument parsing
def parse_hparams(items: Sequence[str]) -> dict[str, Any]:
    from cl_merge.config import parse_value

    out: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ConfigError(f"--set {item!r} is not of the form name=value")
        if name in out:
            raise ConfigError(f"--set gives {name!r} twice")
        out[name] = parse_value(raw)
    return out


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str) -> int:
    """``'2GB'`` -> 2e9 bytes, ``'512MiB'`` -> 512·2^20, ``'1000'`` -> 1000."""
    found = _SIZE.match(str(text))
    if not found:
        raise ConfigError(f"--max-shard-size {text!r} is not a size like 2GB, 500MB or 1048576")
    unit = (found.group(2) or "").lower().removesuffix("b")
    size = int(float(found.group(1)) * _UNITS[unit])
    if size < 1:
        raise ConfigError(f"--max-shard-size must be positive, got {text!r}")
    return size


# ----------------------------------------------------------------- task-vector inputs
class TaskVectorSource:
    """A task-vector checkpoint seen as fine-tuned weights θ0 + τ, lazily.

    Float entries the merge selects must be in the task vector; other
    entries (integer buffers, excluded keys) that it lacks are taken from the
    pretrained model, i.e. a zero task vector there.
    """

    def __init__(self, task_vector, pretrained, key_filter):
        self.tv = task_vector
        self.pre = pretrained
        self.path = getattr(task_vector, "path", "task vector")
        tv_keys = set(task_vector.keys())
        extra = sorted(tv_keys - set(pretrained.keys()))
        if extra:
            raise MergeInputError(f"task vector {self.path} has key {extra[0]!r} that the pretrained model lacks")
        # selected float keys absent from the task vector stay absent, so the
        # key check names them
        self._keys = [k for k in pretrained.keys()
                      if k in tv_keys or not (pretrained.dtype(k).is_floating_point and key_filter.selects(k))]

    def keys(self):
        return list(self._keys)

    def get(self, key: str) -> torch.Tensor:
        if key not in self.tv:
            return self.pre.get(key)
        base = self.pre.get(key)
        delta = self.tv.get(key)
        if not delta.is_floating_point() or tuple(delta.shape) != tuple(base.shape):
            return delta  # the engine reports the mismatch
        return (base.float() + delta.float()).to(base.dtype)

    def shape(self, key: str):
        return self.tv.shape(key) if key in self.tv else self.pre.shape(key)

    def dtype(self, key: str):
        if key not in self.tv:
            return self.pre.dtype(key)
        dtype = self.tv.dtype(key)
        return self.pre.dtype(key) if dtype.is_floating_point else dtype


# ----------------------------------------------------------------- writing
def shard_plan(state_dict: Mapping[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Keys grouped into shards of at most ``max_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, value in state_dict.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def _input_files(path: Path) -> list[Path]:
    """Every file a checkpoint argument reads: the file, an index json and its
    shards, or the files of a folder."""
    path = Path(path)
    if path.is_dir():
        return [p for p in path.iterdir() if p.is_file()]
    files = [path]
    if path.name.endswith(".index.json") and path.is_file():
        try:
            weight_map = json.loads(path.read_text()).get("weight_map", {})
            files += [path.parent / name for name in set(weight_map.values()) if isinstance(name, str)]
        except (OSError, ValueError, AttributeError):
            pass  # the reader reports a bad index
    return files


def _identity(path: Path):
    try:
        st = path.stat()
        return (st.st_dev, st.st_ino)
    except OSError:
        return None


class InputGuard:
    """Refuses output paths that are one of the inputs (same resolved path or
    same inode, e.g. a hard link), so a merge never overwrites what it reads."""

    def __init__(self, inputs: Sequence[str | Path]):
        self.paths: dict[Path, str] = {}
        self.inodes: dict[tuple[int, int], str] = {}
        for given in inputs:
            for file in _input_files(Path(given)):
                self.paths[file.resolve()] = str(given)
                ident = _identity(file)
                if ident is not None:
                    self.inodes[ident] = str(given)

    def check(self, out: Path) -> None:
        clash = self.paths.get(Path(out).resolve())
        ident = _identity(Path(out))
        if clash is None and ident is not None:
            clash = self.inodes.get(ident)
        if clash is not None:
            raise CheckpointError(f"output {out} is the input {clash}: refusing to overwrite an input; "
                                  "choose another --out")


def _check_output(path: Path) -> None:
    if path.is_dir():
        raise CheckpointError(f"output path {path} is a directory; give a file name such as {path / 'merged.safetensors'}")
    if path.suffix not in (".safetensors",) + TORCH_SUFFIXES:
        raise CheckpointError(f"output {path} must end with .safetensors (or {', '.join(TORCH_SUFFIXES)})")


def write_state_dict(state_dict: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str],
                     max_shard_size: int | None, stack: contextlib.ExitStack,
                     guard: InputGuard | None = None) -> Path:
    """Write to temp files registered on ``stack``; they are renamed into
    place only when the whole stack exits without error. Returns the path to
    open the result with (the index json when sharded)."""
    from safetensors.torch import save_file

    from cl_merge.core.io import atomic_path, atomic_write

    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    check = guard.check if guard is not None else (lambda _path: None)
    check(path)
    if path.suffix in TORCH_SUFFIXES:
        if max_shard_size is not None:
            raise CheckpointError(f"--max-shard-size needs a .safetensors output, got {path}")
        handle = stack.enter_context(atomic_write(path))
        torch.save(tensors, handle)
        return path
    _distinct_storage(tensors)
    meta = {str(k): str(v) for k, v in metadata.items()}
    groups = shard_plan(tensors, max_shard_size) if max_shard_size is not None else [list(tensors)]
    if len(groups) == 1 and max_shard_size is None:
        save_file(tensors, str(stack.enter_context(atomic_path(path))), metadata=meta)
        return path
    stem = path.name.removesuffix(".safetensors")
    weight_map = {}
    for i, keys in enumerate(groups):
        shard = path.with_name(f"{stem}-{i + 1:05d}-of-{len(groups):05d}.safetensors")
        check(shard)
        save_file({k: tensors[k] for k in keys}, str(stack.enter_context(atomic_path(shard))), metadata=meta)
        weight_map.update({k: shard.name for k in keys})
    index = path.with_name(path.name + ".index.json")
    check(index)
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    handle = stack.enter_context(atomic_write(index, "w"))
    json.dump({"metadata": {"total_size": total, **meta}, "weight_map": weight_map}, handle, indent=2)
    return index


def _distinct_storage(tensors: dict[str, torch.Tensor]) -> None:
    """safetensors refuses tensors sharing memory (tied weights): clone the later ones."""
    seen: set[int] = set()
    for key, value in tensors.items():
        ptr = value.untyped_storage().data_ptr() if value.numel() else None
        if ptr is not None and ptr in seen:
            tensors[key] = value.clone()
        elif ptr is not None:
            seen.add(ptr)


def task_output_path(path: Path, index: int) -> Path:
    suffix = path.suffix
    return path.with_name(f"{path.name.removesuffix(suffix)}_task{index}{suffix}")


# ----------------------------------------------------------------- main
def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    def wrap(iterator):
        return tqdm(iterator, total=total, desc="merging", unit="tensor", file=sys.stderr,
                    dynamic_ncols=True, leave=False)

    return wrap


def merge_files(pretrained: str | Path, finetuned: Sequence[str | Path], out: str | Path, *,
                method: str = "task_arithmetic", hparams: Mapping[str, Any] | None = None,
                include: Sequence[str] | None = None, exclude: Sequence[str] = (),
                task_vectors: bool = False, check_finite: bool = True,
                max_shard_size: int | None = None, progress: bool = False, device: str | None = None) -> list[Path]:
    """Merge checkpoint files; returns the paths to open the results with
    (the merged model, then one per task for per-task strategies). All
    files are written, or none."""
    from cl_merge.core.io import open_checkpoint
    from cl_merge.core.state_dict import make_filter, plan_merge
    from cl_merge.merging import PerTaskMergeResult, get_method, run_merge

    from cl_merge.merging.base import resolve_device

    out = Path(out)
    _check_output(out)
    strategy = get_method(method, **dict(hparams or {}))
    if not finetuned:
        raise MergeInputError("the list of fine-tuned models is empty: give at least one")
    resolve_device(device)  # a missing GPU fails here, before anything is read
    guard = InputGuard([pretrained, *finetuned])
    guard.check(out)
    if strategy.per_task:
        for i in range(len(finetuned)):
            guard.check(task_output_path(out, i))
    key_filter = make_filter(list(include) if include is not None else None, list(exclude))
    with contextlib.ExitStack() as readers:
        pre = readers.enter_context(open_checkpoint(pretrained))
        fts = [readers.enter_context(open_checkpoint(p)) for p in finetuned]
        if task_vectors:
            fts = [TaskVectorSource(tv, pre, key_filter) for tv in fts]
        plan = plan_merge(pre, fts, key_filter)  # fails early, before any tensor is read
        merged = run_merge(strategy, pre, fts, key_filter=key_filter, check=check_finite,
                           progress=_progress(len(plan.merge_keys), progress), device=device)
        metadata = {
            "cl_merge_method": strategy.name,
            "cl_merge_hparams": json.dumps(strategy.hparams(), default=str, sort_keys=True),
            "cl_merge_inputs": json.dumps([Path(p).name for p in finetuned]),
            "cl_merge_pretrained": Path(pretrained).name,
        }
        with contextlib.ExitStack() as outputs:
            if isinstance(merged, PerTaskMergeResult):
                written = [write_state_dict(dict(merged.shared), out, {**metadata, "cl_merge_part": "shared"},
                                            max_shard_size, outputs, guard)]
                for i in range(merged.num_tasks):
                    written.append(write_state_dict(merged.task_state_dict(i), task_output_path(out, i),
                                                {**metadata, "cl_merge_part": f"task{i}"}, max_shard_size, outputs,
                                                guard))
            else:
                written = [write_state_dict(merged, out, metadata, max_shard_size, outputs, guard)]
    return written


def main(args: argparse.Namespace) -> int:
    hparams = parse_hparams(args.hparams)
    max_shard = parse_size(args.max_shard_size) if args.max_shard_size is not None else None
    written = merge_files(
        args.pretrained, args.finetuned, args.out, method=args.method, hparams=hparams,
        include=args.include, exclude=args.exclude, task_vectors=args.task_vectors,
        check_finite=not args.no_check_finite, max_shard_size=max_shard, progress=not args.no_progress,
        device=args.device,
    )
    for path in written:
        print(path)
    return 0
