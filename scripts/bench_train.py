"""Lightning overhead: the same fine-tuning step in a plain PyTorch loop and
through ``FineTuneModule`` + ``pl.Trainer``.

Both use the same encoder weights, zero-shot head, AdamW, warm-up/cosine
schedule, gradient clipping and DataLoader over the same in-memory tensors;
the Lightning run also has its CSV logger on (as ``finetune`` does) and no
progress bar. A step's time is the time between the starts of consecutive
batches (data fetch + forward + backward + clip + optimizer + hooks), taken
after ``--warmup`` steps. Runs alternate plain / Lightning ``--repeats`` times
and the best mean of each is kept, which damps noise from other processes.

    python scripts/bench_train.py --quick                 # tiny CLIP only
    python scripts/bench_train.py --models tiny,b32       # + open_clip ViT-B-32 (random init, 224 px)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time

import cl_merge  # noqa: F401  (torchvision compatibility shim first)
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from cl_merge.lit.config import TrainConfig
from cl_merge.lit.loggers import make_loggers
from cl_merge.lit.module import FineTuneModule, WarmupCosine
from cl_merge.models import create_model

MODELS = {"tiny": ("clmerge-tiny-clip", 32), "b32": ("ViT-B-32", 224)}


class StepTimer(pl.Callback):
    def __init__(self):
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module):
        self.starts.append(time.perf_counter())


def step_times(starts: list[float], warmup: int) -> list[float]:
    return [b - a for a, b in zip(starts, starts[1:])][warmup:]


def make_loader(n: int, size: int, batch: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(seed))


def plain_loop(encoder, head, cfg: TrainConfig, loader, steps: int) -> list[float]:
    encoder.train()
    params = [p for p in encoder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(cfg.warmup_steps, cfg.max_steps))
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    starts, step = [], 0
    while step < steps:
        for x, y in loader:
            starts.append(time.perf_counter())
            loss = loss_fn(head(encoder(x)).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            if step == steps:
                break
    starts.append(time.perf_counter())
    return starts


def lightning_loop(encoder, head, cfg: TrainConfig, loader, steps: int) -> list[float]:
    timer = StepTimer()
    module = FineTuneModule(encoder, head, cfg, num_classes=10)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(max_steps=steps, max_epochs=-1, accelerator="cpu", devices=1,
                             gradient_clip_val=cfg.grad_clip, logger=make_loggers(tmp), callbacks=[timer],
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             log_every_n_steps=min(10, steps), limit_val_batches=0, num_sanity_val_steps=0)
        trainer.fit(module, train_dataloaders=loader)
    return timer.starts


def bench(key: str, batch: int, steps: int, warmup: int, repeats: int) -> dict:
    name, size = MODELS[key]
    model = create_model("clip", name, head_cache_dir=None)
    head = model.make_head([f"class {i}" for i in range(10)], ["a photo of a {}."])
    total = warmup + steps
    cfg = TrainConfig(max_steps=total, batch_size=batch, lr=1e-5, weight_decay=0.1, warmup_steps=min(500, total),
                      grad_clip=1.0, progress_bar=False)
    loader = make_loader(batch * total, size, batch, seed=0)
    best = {"plain": float("inf"), "lightning": float("inf")}
    best_median = dict(best)
    for _ in range(repeats):
        for kind, loop in (("plain", plain_loop), ("lightning", lightning_loop)):
            times = step_times(loop(copy.deepcopy(model.encoder), head, cfg, loader, total), warmup)
            best[kind] = min(best[kind], statistics.mean(times))
            best_median[kind] = min(best_median[kind], statistics.median(times))
            print(f"  {key} {kind}: mean {statistics.mean(times):.4f}s median {statistics.median(times):.4f}s "
                  f"over {len(times)} steps", file=sys.stderr, flush=True)
    return {
        "model": f"{name} ({size} px, {model.num_parameters() / 1e6:.1f}M encoder params)",
        "batch": batch, "steps": steps, "plain": best["plain"], "lightning": best["lightning"],
        "overhead": best["lightning"] / best["plain"] - 1.0,
        "plain_median": best_median["plain"], "lightning_median": best_median["lightning"],
        "overhead_median": best_median["lightning"] / best_median["plain"] - 1.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,b32", help="comma list of: " + ", ".join(MODELS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 40 tiny / 4 b32)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 5 tiny / 1 b32)")
    parser.add_argument("--repeats", type=int, default=None, help="alternating runs per loop (default 3 / 1)")
    parser.add_argument("--quick", action="store_true", help="tiny CLIP only, 20 steps, 2 repeats")
    args = parser.parse_args(argv)
    keys = ["tiny"] if args.quick else [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r} (choose from {', '.join(MODELS)})")
    rows = []
    for key in keys:
        small = key == "tiny"
        steps = args.steps or (20 if args.quick else 40 if small else 4)
        warmup = args.warmup if args.warmup is not None else (5 if small else 1)
        repeats = args.repeats or (2 if args.quick else 3 if small else 1)
        rows.append(bench(key, args.batch, steps, warmup, repeats))
    print(f"\ntorch {torch.__version__}, Lightning {pl.__version__}, {torch.get_num_threads()} threads, CPU\n")
    print("| model | batch | timed steps | plain s/step mean (median) | Lightning s/step mean (median) "
          "| overhead mean (median) | plain img/s | Lightning img/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['steps']} | {r['plain']:.4f} ({r['plain_median']:.4f}) | "
              f"{r['lightning']:.4f} ({r['lightning_median']:.4f}) | {r['overhead'] * 100:+.1f}% "
              f"({r['overhead_median'] * 100:+.1f}%) | {r['batch'] / r['plain']:.0f} | {r['batch'] / r['lightning']:.0f} |")
    print("\ntarget: Lightning within 3% of the plain loop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
