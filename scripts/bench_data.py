"""Benchmark of the streaming data pipeline (issue 8): peak memory and images/s.

Writes a synthetic dataset of JPEG images (224 px) as an ImageFolder task
(``train/<class>/*.jpg``, ``test/<class>/*.jpg``) and the same images as a
local Hugging Face dataset (``save_to_disk``), then, for each size and layout,
in a fresh process:

- ``pipeline``: one pass over the training loader of ``TaskDataModule``
  (decode + the model's preprocessing in DataLoader workers), images/s;
- ``finetune``: a short fine-tune of a tiny 224-px CLIP encoder through
  ``cl_merge.lit.finetune`` (``--steps`` steps) plus a full evaluation of the
  test split streamed by ``cl_merge.lit.evaluate``, images/s of each;
- ``plain``: a plain ``torchvision.datasets.ImageFolder`` + ``DataLoader``
  pass with the same workers, batch size and transform (the reference).

Peak memory is the largest sum of the resident sets (VmRSS) of the process and
all its DataLoader workers, sampled every 50 ms (an upper bound: pages shared
between workers count once per process), and the same sum of their private
(anonymous) resident memory, RssAnon: VmRSS also counts the pages of
memory-mapped files (the Arrow files of a Hugging Face dataset), which the
kernel drops under memory pressure.

    python scripts/bench_data.py --sizes 10000 50000 --workers 2 --out /tmp/bench_data

The datasets are written once per size (``folder_<size>``, ``hf_<size>`` under
``--data-dir``, default ``--out``) and reused by later runs.

Throughput is given per second of wall-clock time and per CPU second of the
process and its workers (the latter moves less when other jobs share the
machine). Results are printed as a table and written to ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

NUM_CLASSES = 10
IMAGE_SIZE = 224
TEST_FRACTION = 0.2
BENCH_MODEL = "clmerge-bench-224"
# a 224-px CLIP small enough for 2 CPU cores: ViT with 32-px patches (7x7 tokens), 2 blocks of width 64
BENCH_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1},
}


# --------------------------------------------------------------------- memory
def _rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) of ``pid`` in KiB: all resident pages, and the private
    (anonymous) ones; the difference is file-backed pages such as memory-mapped
    Arrow files, which the kernel can drop at any time."""
    rss = anon = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("RssAnon:"):
                    anon = int(line.split()[1])
    except OSError:
        pass
    return rss, anon


def _cpu_ticks(pid: int) -> int:
    """User + system CPU time of ``pid`` so far, in clock ticks (0 once it has exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    except (OSError, IndexError, ValueError):
        return 0


def _descendants(pid: int) -> list[int]:
    out, stack = [], [pid]
    while stack:
        current = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{current}/task/{task}/children") as f:
                    children = [int(c) for c in f.read().split()]
            except OSError:
                children = []
            out += children
            stack += children
    return out


class PeakRSS:
    """Largest RSS of this process plus its descendants, sampled in a thread;
    also the CPU time they spent meanwhile (``cpu_seconds``: images per CPU
    second is the pipeline's cost, which other jobs on a shared machine do
    not change as much as its wall-clock rate; a worker's time is counted up
    to its last sample, at most one interval before it exits)."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak_kib, self.peak_anon_kib, self._stop = interval, 0, 0, threading.Event()
        self._ticks: dict[int, int] = {}

    def _run(self):
        pid = os.getpid()
        while not self._stop.is_set():
            pids = [pid, *_descendants(pid)]
            samples = [_rss_kib(p) for p in pids]
            self.peak_kib = max(self.peak_kib, sum(r for r, _ in samples))
            self.peak_anon_kib = max(self.peak_anon_kib, sum(a for _, a in samples))
            for p in pids:
                self._ticks[p] = max(self._ticks.get(p, 0), _cpu_ticks(p))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._start_ticks = _cpu_ticks(os.getpid())
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._ticks[os.getpid()] = _cpu_ticks(os.getpid())

    def start_cpu(self) -> None:
        """Count CPU time from now (the timed loop), not the set-up before it."""
        self._start_ticks = _cpu_ticks(os.getpid())
        self._ticks = {p: t for p, t in self._ticks.items() if p == os.getpid()}

    @property
    def cpu_seconds(self) -> float:
        return (sum(self._ticks.values()) - self._start_ticks) / os.sysconf("SC_CLK_TCK")

    @property
    def peak_gib(self) -> float:
        return self.peak_kib / 2**20


# --------------------------------------------------------------------- data
def _image(index: int, label: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(index)
    # a smooth class-coloured gradient plus noise: JPEGs of realistic size (~15 kB), not all alike
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    base = np.stack([(x * (label + 1)) % 256, (y * 3 + label * 25) % 256, ((x + y) // 2) % 256], axis=-1)
    noisy = base + rng.normal(0, 24, size=base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def write_dataset(out: Path, size: int) -> tuple[Path, Path]:
    """``out/folder_<size>`` (ImageFolder task) and ``out/hf_<size>`` (save_to_disk), written once."""
    folder, hf = out / f"folder_{size}", out / f"hf_{size}"
    if not (folder / "done").exists():
        n_test = int(size * TEST_FRACTION)
        for i in range(size):
            split = "test" if i < n_test else "train"
            label = i % NUM_CLASSES
            path = folder / split / f"class_{label}" / f"{i:06d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            _image(i, label).save(path, quality=90)
        (folder / "done").write_text("ok")
    if not (hf / "dataset_dict.json").exists():
        import datasets

        features = datasets.Features({"image": datasets.Image(),
                                      "label": datasets.ClassLabel(names=[f"class {k}" for k in range(NUM_CLASSES)])})

        def rows(split):
            for class_dir in sorted((folder / split).iterdir()):
                label = int(class_dir.name.split("_")[1])
                for path in sorted(class_dir.iterdir()):
                    yield {"image": {"bytes": path.read_bytes(), "path": None}, "label": label}

        parts = {s: datasets.Dataset.from_generator(rows, gen_kwargs={"split": s}, features=features,
                                                    cache_dir=str(out / "hf_cache"))
                 for s in ("train", "test")}
        datasets.DatasetDict(parts).save_to_disk(str(hf))
    return folder, hf


# --------------------------------------------------------------------- one measurement (child process)
def _model():
    import open_clip

    from cl_merge.models import create_model

    config_dir = Path(tempfile.mkdtemp(prefix="bench_model_"))
    (config_dir / f"{BENCH_MODEL}.json").write_text(json.dumps(BENCH_CONFIG))
    open_clip.add_model_config(config_dir)
    return create_model("clip", BENCH_MODEL, head_cache_dir=None)


def time_loader(loader, peak) -> dict:
    """One timed pass over ``loader`` (CPU accounting starts with it)."""
    peak.start_cpu()
    started, n = time.perf_counter(), 0
    for images, _ in loader:
        n += len(images)
    return {"pipeline_images_per_s": n / (time.perf_counter() - started), "images": n}

def measure(kind: str, layout: str, path: Path, args) -> dict:
    import torch

    torch.set_num_threads(max(1, args.threads))
    import cl_merge  # noqa: F401
    from cl_merge.data import TaskSpec, load_task

    model = _model()
    transform = model.preprocess(train=False)
    result = {"kind": kind, "layout": layout, "path": str(path)}
    with PeakRSS() as peak:
        if kind == "plain":
            from torchvision.datasets import ImageFolder

            dataset = ImageFolder(str(path / "train"), transform=transform)
            loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=True,
                                                 num_workers=args.workers, drop_last=True)
            result.update(time_loader(loader, peak))
        else:
            spec = {"folder": str(path)} if layout == "folder" else {"hf": str(path)}
            task = load_task(TaskSpec(spec, val_fraction=0.0), seed=0)
            if kind == "pipeline":
                from cl_merge.lit.datamodule import TaskDataModule

                dm = TaskDataModule(task, train_transform=transform, eval_transform=transform,
                                    batch_size=args.batch, num_workers=args.workers)
                dm.setup("fit")
                loader = dm.train_dataloader()
                result.update(time_loader(loader, peak))
            else:
                from cl_merge.lit import TrainConfig, evaluate, finetune

                cfg = TrainConfig(max_steps=args.steps, batch_size=args.batch, lr=1e-4, warmup_steps=1,
                                  accelerator=args.accelerator, num_workers=args.workers, progress_bar=False,
                                  eval_splits=[], checkpoint_every_n_steps=None, precision=args.precision)
                out = Path(tempfile.mkdtemp(prefix="bench_ft_"))
                started = time.perf_counter()
                ft = finetune(model, task, cfg, out_dir=out, seed=0)
                result["train_images_per_s"] = args.steps * args.batch / (time.perf_counter() - started)
                head = model.make_head(task.classnames, task.templates)
                started = time.perf_counter()
                acc = evaluate(model, ft.encoder_state(), head, task.test, batch_size=args.batch * 2,
                               num_workers=args.workers, device=None, precision=args.precision)
                result["eval_images_per_s"] = len(task.test) / (time.perf_counter() - started)
                result["test_images"], result["test_acc"] = len(task.test), acc
    result["cpu_seconds"] = round(peak.cpu_seconds, 1)
    if "images" in result:
        result["pipeline_images_per_cpu_s"] = result["images"] / max(peak.cpu_seconds, 1e-9)
    result["peak_rss_gib"] = round(peak.peak_gib, 3)
    result["peak_anon_gib"] = round(peak.peak_anon_kib / 2**20, 3)
    return result


# --------------------------------------------------------------------- driver
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 50000])
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "cl_merge_bench_data")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="where the synthetic datasets are written once and reused (default: --out)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="fine-tuning steps")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--kinds", nargs="+", default=["plain", "pipeline", "finetune"])
    parser.add_argument("--layouts", nargs="+", default=["folder", "hf"])
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of all measurements, one after the other (on a shared machine the ratios "
                             "within a round are the comparable ones)")
    parser.add_argument("--measure", nargs=3, metavar=("KIND", "LAYOUT", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure[0], args.measure[1], Path(args.measure[2]), args)))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for size in args.sizes:
        started = time.perf_counter()
        folder, hf = write_dataset(args.data_dir or args.out, size)
        print(f"[{size}] dataset ready in {time.perf_counter() - started:.0f} s: {folder}, {hf}", flush=True)
        runs = [("plain", "folder", folder)] if "plain" in args.kinds else []
        runs += [(k, layout, folder if layout == "folder" else hf) for k in ("pipeline", "finetune")
                 if k in args.kinds for layout in args.layouts]
        for (kind, layout, path), repeat in [(run, r) for r in range(args.repeats) for run in runs]:
            passthrough = ["--workers", str(args.workers), "--threads", str(args.threads), "--batch", str(args.batch),
                           "--steps", str(args.steps), "--accelerator", args.accelerator,
                           "--precision", args.precision]
            proc = subprocess.run([sys.executable, __file__, *passthrough, "--measure", kind, layout, str(path)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return proc.returncode
            row = {"size": size, "repeat": repeat, **json.loads(proc.stdout.strip().splitlines()[-1])}
            results.append(row)
            print(json.dumps(row), flush=True)
            (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n{'size':>6} {'round':>5} {'kind':>9} {'layout':>7} {'peak RSS GiB':>13} {'anon GiB':>9} "
          f"{'pipeline img/s':>15} {'vs plain':>8} {'img/CPU-s':>9} {'vs plain':>8} {'train img/s':>12} "
          f"{'eval img/s':>11}")
    for r in results:
        fmt = lambda key: f"{r[key]:.0f}" if key in r else "-"  # noqa: E731
        plain = [p for p in results if p["kind"] == "plain" and (p["size"], p["repeat"]) == (r["size"], r["repeat"])]
        ratio = lambda key: (f"{r[key] / plain[0][key]:.0%}" if plain and key in r and key in plain[0]  # noqa: E731
                             else "-")
        print(f"{r['size']:>6} {r['repeat']:>5} {r['kind']:>9} {r['layout']:>7} {r['peak_rss_gib']:>13.2f} "
              f"{r.get('peak_anon_gib', 0):>9.2f} {fmt('pipeline_images_per_s'):>15} "
              f"{ratio('pipeline_images_per_s'):>8} {fmt('pipeline_images_per_cpu_s'):>9} "
              f"{ratio('pipeline_images_per_cpu_s'):>8} {fmt('train_images_per_s'):>12} {fmt('eval_images_per_s'):>11}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
