#!/usr/bin/env python
"""Time the data-free merging strategies on ViT-B/32- or ViT-L/14-sized inputs.

Builds a pretrained model shaped like an open_clip visual tower (``--model``:
``ViT-B-32``, 87.8M parameters, by default; ``ViT-B-16``; ``ViT-L-14``, 304M)
with random values, and N fine-tuned copies (pretrained + small seeded
noise), writes them as safetensors to a temp folder, then runs every
(method, mode, N) in its own subprocess for a clean peak-memory reading:

- ``memory``: inputs loaded into state dicts first, then ``cl_merge.merge``;
- ``stream``: lazy safetensors readers (``run_merge`` reads one tensor per
  model at a time), as ``cl-merge merge`` does.

Reported per run: wall time of the merge, its ratio to one read pass over all
inputs (the bandwidth floor of any merge; a second floor row adds allocating
and writing one model-sized output, which any merge returning new tensors
also pays), and the peak RSS above the level
before the merge (VmRSS, and RssAnon, which leaves out the file-backed pages
of the inputs' page cache that an mmap reader touches).

    python scripts/bench_merge.py --quick                      # small shapes, seconds
    python scripts/bench_merge.py --methods task_arithmetic,ties,ties:topk_scope=per_tensor
    python scripts/bench_merge.py --models 2,4,8 --modes stream --methods task_arithmetic
    python scripts/bench_merge.py --against fusion_bench
    python scripts/bench_merge.py --device cuda --methods ties,tsv_m --models 8,20
    python scripts/bench_merge.py --model ViT-L-14 --modes stream --models 8,20

The inputs are built from the towers' shapes alone (no open_clip needed, so
the script runs on a machine that has torch and safetensors only).

A method spec is ``name`` or ``name:param=value:param=value``. Besides wall
time, each run reports its process CPU time (all threads): on a shared,
loaded machine the ratio of CPU times is the steadier comparison.

``--against fusion_bench`` times FusionBench 0.2.x's own functions on the
same inputs (task arithmetic through its state-dict helpers, TIES through
``ties_merging``, TSV-M through ``compute_and_sum_svd_mem_reduction``, Iso-C
and Iso-CTS through ``iso_c`` / ``iso_cts``), each in its own process, with
the hyperparameters of our matching rows (TIES: density 0.2 = its
``reset_thresh=20``, disjoint sum). FusionBench must be importable by the
interpreter given with ``--fb-python`` (or the ``CL_MERGE_FB_PYTHON``
environment variable; default: this one), e.g. a separate virtual
environment with ``fusion_bench`` installed (its worker imports this
checkout from the source tree). FusionBench's inputs stay mmap-backed (page
cache, touched before the timer) so that its extra memory is its own.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GB = 1e9
FLOOR = "read pass (floor)"
# the least any merge that returns new tensors costs: the read pass plus
# allocating and writing one model-sized output (the kernel zero-fills fresh pages)
WRITE_FLOOR = "read + new output (floor)"
FB_METHODS = ("fusion_bench:task_arithmetic", "fusion_bench:ties", "fusion_bench:tsv_m", "fusion_bench:iso_c",
              "fusion_bench:iso_cts")
# our spec timed against each FusionBench row (same hyperparameters)
FB_COUNTERPART = {"task_arithmetic": ("task_arithmetic",),
                  "ties": ("ties:aggregate=sum:scaling=0.3", "ties:aggregate=sum:scaling=0.3:topk_scope=per_tensor"),
                  "tsv_m": ("tsv_m",), "iso_c": ("iso_c",), "iso_cts": ("iso_cts",)}


# ----------------------------------------------------------------- inputs
def vit_visual_shapes(width: int, layers: int, patch: int = 32, image: int = 224, out_dim: int = 512) -> dict:
    """Key -> shape of an open_clip VisionTransformer's state dict."""
    grid = image // patch
    shapes = {"class_embedding": (width,), "positional_embedding": (grid * grid + 1, width),
              "proj": (width, out_dim), "conv1.weight": (width, 3, patch, patch),
              "ln_pre.weight": (width,), "ln_pre.bias": (width,)}
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        shapes.update({
            p + "ln_1.weight": (width,), p + "ln_1.bias": (width,),
            p + "attn.in_proj_weight": (3 * width, width), p + "attn.in_proj_bias": (3 * width,),
            p + "attn.out_proj.weight": (width, width), p + "attn.out_proj.bias": (width,),
            p + "ln_2.weight": (width,), p + "ln_2.bias": (width,),
            p + "mlp.c_fc.weight": (4 * width, width), p + "mlp.c_fc.bias": (4 * width,),
            p + "mlp.c_proj.weight": (width, 4 * width), p + "mlp.c_proj.bias": (width,),
        })
    shapes.update({"ln_post.weight": (width,), "ln_post.bias": (width,)})
    return shapes


# open_clip's vision_cfg (width, layers, patch) and embed_dim of each tower;
# "tiny" is --quick's
VISUAL_TOWERS = {"ViT-B-32": (768, 12, 32, 512), "ViT-B-16": (768, 12, 16, 512), "ViT-L-14": (1024, 24, 14, 768),
                 "tiny": (192, 4, 32, 512)}


def tower_shapes(model: str) -> dict:
    width, layers, patch, out_dim = VISUAL_TOWERS[model]
    return vit_visual_shapes(width, layers, patch=patch, out_dim=out_dim)


def decaying_task_vector(shape: tuple, generator, scale: float = 1e-3) -> "torch.Tensor":
    """A matrix whose singular values fall as 1/i (G1·diag(1/i)·G2 with
    Gaussian G1, G2), the fast decay fine-tuning updates show; its Gram
    matrix is far beyond the SVD family's float32 condition limit."""
    import torch

    rank = min(shape)
    left = torch.randn(shape[0], rank, generator=generator)
    left.mul_(1.0 / torch.arange(1, rank + 1, dtype=left.dtype))
    matrix = left @ torch.randn(rank, shape[1], generator=generator)
    return matrix.mul_(scale * (shape[0] * shape[1]) ** 0.5 / matrix.norm())


def build_inputs(folder: Path, num_models: int, model: str, seed: int = 0, spectrum: str = "flat") -> list[Path]:
    """Write (or, in a --workdir that holds them already, reuse) the inputs.
    ``spectrum``: "flat", task vectors of i.i.d. noise; "decaying", 2-D task
    vectors with singular values falling as 1/i (``decaying_task_vector``)."""
    import torch

    from cl_merge.core.io import save_state_dict

    stamp = folder / "inputs.json"
    wanted = {"num_models": num_models, "model": model, "seed": seed, "spectrum": spectrum}
    paths = [folder / "pretrained.safetensors"] + [folder / f"finetuned_{i}.safetensors" for i in range(num_models)]
    if stamp.exists() and json.loads(stamp.read_text()) == wanted and all(p.exists() for p in paths):
        return paths

    gen = torch.Generator().manual_seed(seed)
    # random values, as open_clip's own initialisation: costs depend on the
    # shapes, except the SVD family's precision rule, which sees the task
    # vectors' conditioning (hence ``spectrum``)
    pre = {k: 0.02 * torch.randn(s, generator=gen) for k, s in tower_shapes(model).items()}
    paths = [save_state_dict(pre, folder / "pretrained.safetensors")]

    def task_vector(value):
        if spectrum == "decaying" and value.dim() == 2:
            return decaying_task_vector(tuple(value.shape), gen)
        return 1e-3 * torch.randn(value.shape, generator=gen)

    for i in range(num_models):
        ft = {k: v + task_vector(v) for k, v in pre.items()}
        paths.append(save_state_dict(ft, folder / f"finetuned_{i}.safetensors"))
        del ft
    stamp.write_text(json.dumps(wanted))
    return paths


# ----------------------------------------------------------------- measuring (worker side)
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class PeakSampler:
    """Background sampler of VmRSS / RssAnon (every 2 ms)."""

    def __init__(self):
        self.base_rss, self.base_anon = _status_kb("VmRSS"), _status_kb("RssAnon")
        self.peak_rss, self.peak_anon = self.base_rss, self.base_anon
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, _status_kb("VmRSS"))
            self.peak_anon = max(self.peak_anon, _status_kb("RssAnon"))
            time.sleep(0.002)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._run_once()

    def _run_once(self):
        self.peak_rss = max(self.peak_rss, _status_kb("VmRSS"))
        self.peak_anon = max(self.peak_anon, _status_kb("RssAnon"))


def parse_spec(spec: str) -> tuple[str, dict]:
    from cl_merge.config import parse_value

    name, *items = spec.split(":")
    if name == "fusion_bench":
        return spec, {}
    return name, {k: parse_value(v) for k, v in (item.split("=", 1) for item in items)}


def fusion_bench_merge(kind: str, pre: dict, fts: list[dict]):
    """FusionBench 0.2.x through its public helpers, as its algorithms call them."""
    import torch

    if kind == "task_arithmetic":
        from fusion_bench.utils.state_dict_arithmetic import state_dict_add, state_dict_mul, state_dict_sub

        total = None
        for ft in fts:
            tv = state_dict_sub(ft, pre)
            total = tv if total is None else state_dict_add(total, tv)
        return state_dict_add(pre, state_dict_mul(total, 0.3))
    if kind in ("tsv_m", "iso_c", "iso_cts"):
        import contextlib
        import io

        from fusion_bench.utils.state_dict_arithmetic import state_dict_add, state_dict_mul, state_dict_sub

        tvs = [state_dict_sub(ft, pre) for ft in fts]
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per tensor
            if kind == "tsv_m":
                from fusion_bench.method.task_singular_vector.utils.TSVM_utils import (
                    compute_and_sum_svd_mem_reduction,
                )

                merged_tv = compute_and_sum_svd_mem_reduction(tvs, exclude_keys=[], accelerator="cpu")
                scale = 1.0
            else:
                from fusion_bench.method.isotropic_merging import iso_utils

                if kind == "iso_c":
                    merged_tv = iso_utils.iso_c(tvs, accelerator="cpu", exclude_keys=[])
                else:
                    merged_tv = iso_utils.iso_cts(tvs, common_space_fraction=0.8, accelerator="cpu",
                                                  exclude_keys=[])
                scale = 1.5
        return state_dict_add(pre, state_dict_mul(merged_tv, scale))
    from fusion_bench.method.ties_merging.ties_merging_utils import (
        state_dict_to_vector,
        ties_merging,
        vector_to_state_dict,
    )

    flat_ft = torch.vstack([state_dict_to_vector(ft, []) for ft in fts])
    flat_pre = state_dict_to_vector(pre, [])
    merged_tv = ties_merging(flat_ft - flat_pre, reset_thresh=20, merge_func="sum")
    return vector_to_state_dict(flat_pre + 0.3 * merged_tv, pre, remove_keys=[])


def load_state_dicts_touched(paths) -> list[dict]:
    from cl_merge.core.io import load_state_dict

    inputs = [load_state_dict(p) for p in paths]
    for sd in inputs:
        for value in sd.values():
            float(value.sum())  # maps every page of the file
    return inputs


def worker(job: dict) -> dict:
    import torch

    import cl_merge
    from cl_merge.core.io import load_state_dict, open_checkpoint
    from cl_merge.errors import ClMergeError
    from cl_merge.merging import get_method, run_merge

    paths = job["paths"]
    spec, mode = job["method"], job["mode"]
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    if mode == "memory" and spec.startswith("fusion_bench:"):
        # FusionBench's TIES holds ~5 flattened copies of all models: its inputs
        # stay in the page cache (mmap-backed tensors, touched once here so no
        # page fault is timed), which leaves it the whole memory for its own work
        inputs = load_state_dicts_touched(paths)
    elif mode == "memory":
        # safetensors hands out mmap-backed tensors: clone into process memory
        inputs = [{k: v.clone() for k, v in load_state_dict(p).items()} for p in paths]
    else:
        inputs = [open_checkpoint(p) for p in paths]
    pre, fts = inputs[0], inputs[1:]
    with torch.no_grad():
        if spec.startswith("fusion_bench:"):
            try:
                import fusion_bench  # noqa: F401
            except ImportError:
                return {"error": "fusion_bench not installed"}
            run = lambda: fusion_bench_merge(spec.split(":", 1)[1], pre, fts)  # noqa: E731
        elif spec in (FLOOR, WRITE_FLOOR):
            if mode == "memory":
                read = lambda: [float(v.sum()) for sd in inputs for v in sd.values() if v.is_floating_point()]  # noqa: E731
                shapes = {k: v.shape for k, v in pre.items() if v.is_floating_point()}
            else:
                # get_tensor maps the file lazily: the sum makes the read happen
                read = lambda: [float(r.get(k).sum()) for r in inputs for k in r.keys()  # noqa: E731
                                if r.dtype(k).is_floating_point]
                shapes = {k: pre.shape(k) for k in pre.keys() if pre.dtype(k).is_floating_point}
            run = read if spec == FLOOR else \
                lambda: (read(), [torch.empty(shape).fill_(0.0) for shape in shapes.values()])  # noqa: E731
        else:
            name, hparams = parse_spec(spec)
            try:
                strategy = get_method(name, **hparams)
            except ClMergeError as exc:
                return {"error": str(exc)}
            device = job.get("device")
            run = lambda: run_merge(strategy, pre, fts, device=device)  # noqa: E731
        # warm up the thread pool and allocator on a tiny merge (not timed)
        # (on the merge's device: a CUDA context's start is not timed either)
        tiny = {"w": torch.ones(64, 64)}
        cl_merge.merge(tiny, [tiny, tiny], device=job.get("device"))
        with PeakSampler() as sampler:
            start, cpu_start = time.perf_counter(), time.process_time()
            try:
                result = run()
            except ClMergeError as exc:
                return {"error": str(exc).splitlines()[0][:80]}
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        del result
        # fast runs are repeated (best of up to `repeat`): the machine may be shared
        for _ in range(job.get("repeat", 3) - 1):
            if seconds > 20:
                break
            start, cpu_start = time.perf_counter(), time.process_time()
            run()
            seconds = min(seconds, time.perf_counter() - start)
            cpu = min(cpu, time.process_time() - cpu_start)
    return {"seconds": seconds, "cpu_seconds": cpu,
            "peak_rss_gb": (sampler.peak_rss - sampler.base_rss) * 1024 / GB,
            "peak_anon_gb": (sampler.peak_anon - sampler.base_anon) * 1024 / GB, "cl_merge": cl_merge.__version__}


# ----------------------------------------------------------------- driver
def run_job(job: dict, timeout: float, python: str | None = None) -> dict:
    cmd = [python or sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job)]
    # another interpreter (FusionBench's environment) imports this checkout from its source tree
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                      env.get("PYTHONPATH")]))
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"exit {done.returncode}: {tail[:100]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def default_methods() -> list[str]:
    import cl_merge

    names = cl_merge.available_methods()
    out = []
    for name in names:
        out.append(name)
        if name in ("ties", "dare_ties"):
            out.append(f"{name}:topk_scope=per_tensor")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="8", help="numbers of fine-tuned models, comma separated (2,4,8)")
    parser.add_argument("--methods", default=None, help="comma-separated method specs (default: all registered)")
    parser.add_argument("--skip", default="", help="comma-separated method names to leave out (e.g. slow SVD ones)")
    parser.add_argument("--modes", default="memory,stream", help="memory, stream or both")
    parser.add_argument("--model", default="ViT-B-32", choices=[m for m in VISUAL_TOWERS if m != "tiny"],
                        help="open_clip visual tower whose shapes the inputs take")
    parser.add_argument("--quick", action="store_true", help="small ViT shapes (4 blocks of width 192)")
    parser.add_argument("--spectrum", default="flat", choices=["flat", "decaying"],
                        help="task vectors of i.i.d. noise (flat), or 2-D ones with singular values ∝ 1/i")
    parser.add_argument("--against", default=None, choices=["fusion_bench"],
                        help="also time FusionBench's TA, TIES, TSV-M, Iso-C and Iso-CTS on the same inputs")
    parser.add_argument("--fb-python", default=os.environ.get("CL_MERGE_FB_PYTHON"),
                        help="interpreter that can import fusion_bench (default: $CL_MERGE_FB_PYTHON, else this one)")
    parser.add_argument("--device", default=None, help="run our merges on this device (e.g. cuda); inputs stay on the CPU")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads per run (0: torch's default; 1 is steadier on a busy machine)")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many timings for runs under 20 s")
    parser.add_argument("--workdir", default=None,
                        help="folder for the generated inputs, kept and reused by later runs (default: a temp folder)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    counts = sorted({int(n) for n in args.models.split(",")})
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else default_methods()
    methods = [m for m in methods if m.split(":")[0] not in skip]
    if args.against == "fusion_bench":
        wanted = {m.split(":")[0] for m in methods}
        methods += [fb for fb in FB_METHODS if fb.split(":", 1)[1] in wanted]
        methods += [spec for n in sorted(wanted) for spec in FB_COUNTERPART.get(n, ()) if spec not in methods]
        # FusionBench's TIES holds several flattened copies of all models: run it last
        methods.sort(key=lambda spec: spec == "fusion_bench:ties")

    folder = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_merge_"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        model = "tiny" if args.quick else args.model
        paths = [str(p) for p in build_inputs(folder, max(counts), model, spectrum=args.spectrum)]
        size = sum(os.path.getsize(p) for p in paths[: max(counts) + 1]) / GB
        print(f"inputs: 1 pretrained + {max(counts)} fine-tuned, {size:.2f} GB of fp32 safetensors "
              f"(built in {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        rows = []
        for count in counts:
            job_paths = paths[: count + 1]
            for mode in modes:
                floor = run_job({"paths": job_paths, "method": FLOOR, "mode": mode, "repeat": args.repeat,
                                  "threads": args.threads}, args.timeout)
                rows.append((FLOOR, mode, count, floor, floor.get("seconds")))
                write_floor = run_job({"paths": job_paths, "method": WRITE_FLOOR, "mode": mode,
                                       "repeat": args.repeat, "threads": args.threads}, args.timeout)
                rows.append((WRITE_FLOOR, mode, count, write_floor, floor.get("seconds")))
                for spec in methods:
                    if spec.startswith("fusion_bench:") and mode != "memory":
                        continue
                    is_fb = spec.startswith("fusion_bench:")
                    result = run_job({"paths": job_paths, "method": spec, "mode": mode, "repeat": args.repeat,
                                      "threads": args.threads, "device": None if is_fb else args.device},
                                     args.timeout, args.fb_python if is_fb else None)
                    rows.append((spec, mode, count, result, floor.get("seconds")))
                    print(f"  {spec} [{mode}, N={count}]: {result}", file=sys.stderr)
        print(format_table(rows, model, model_gb=os.path.getsize(paths[0]) / GB))
    finally:
        if not args.workdir:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


def format_table(rows, model: str, model_gb: float = 0.0) -> str:
    params = sum(math.prod(shape) for shape in tower_shapes(model).values()) / 1e6
    shape = ("quick ViT shapes (4 blocks of width 192)" if model == "tiny"
             else f"open_clip {model} visual tower shapes ({params:.1f}M params, fp32)")
    out = [f"Inputs: {shape}; peak memory is above the level before the merge.", "",
           "| method | mode | N | time (s) | CPU (s) | × read floor | peak ΔRSS (GB) | peak ΔAnon (GB) |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    fb = {}
    for spec, mode, count, result, floor in rows:
        if "error" in result:
            out.append(f"| {spec} | {mode} | {count} | {result['error']} | | | | |")
            continue
        ratio = f"{result['seconds'] / floor:.1f}" if floor else ""
        out.append(f"| {spec} | {mode} | {count} | {result['seconds']:.2f} | {result.get('cpu_seconds', 0):.2f} | "
                   f"{ratio} | {result['peak_rss_gb']:.2f} | {result['peak_anon_gb']:.2f} |")
        fb[(spec, mode, count)] = (result["seconds"], result.get("cpu_seconds") or result["seconds"],
                                   result["peak_anon_gb"])
    ratios = []
    copies = (lambda gb: f", {gb / model_gb:.2f} model copies") if model_gb else (lambda gb: "")
    for kind, ours in ((k, spec) for k, specs in FB_COUNTERPART.items() for spec in specs):
        for (spec, mode, count), (seconds, cpu, anon) in fb.items():
            if spec == f"fusion_bench:{kind}" and (ours, mode, count) in fb:
                mine, mine_cpu, mine_anon = fb[(ours, mode, count)]
                ratios.append(f"- {ours} vs FusionBench {kind}, N={count}: FusionBench {seconds:.2f} s "
                              f"(CPU {cpu:.2f} s, +{anon:.2f} GB) / cl_merge {mine:.2f} s (CPU {mine_cpu:.2f} s, "
                              f"+{mine_anon:.2f} GB{copies(mine_anon)}) = {seconds / mine:.1f}× faster "
                              f"(CPU time: {cpu / mine_cpu:.1f}×)")
    if ratios:
        out += ["", "Speed-up over FusionBench (same inputs, same run; +GB: peak extra anonymous memory, "
                "the output included):", *ratios]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
