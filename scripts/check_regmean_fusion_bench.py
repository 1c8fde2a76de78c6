#!/usr/bin/env python
"""RegMean through the Python contract against FusionBench's own ``regmean_merging``.

    python scripts/check_regmean_fusion_bench.py --fb-python /path/to/venv-with-fusion_bench/bin/python

Both sides get the same fixed inputs: θ0 and three fine-tuned models of a
small token model (linear maps over [batch, tokens, features] inputs, so the
Gram's rows are batch × tokens, as in a ViT), and per task a list of dict
batches of different sizes. Ours: ``cl_merge.merge(pre, fts, method="regmean",
model=module, data=data, num_examples=N, reduce_non_diagonal_ratio=r)``.
FusionBench 0.2.x: ``fusion_bench.method.regmean.regmean.regmean_merging``
(forward hooks on every ``nn.Linear``, running mean of XᵀX over rows,
``nums_regmean_examples`` counted in batch rows, checked before each batch),
fed through a minimal trainer object that yields the same batches. The
FusionBench side runs in its own interpreter (``--fb-python``), since
FusionBench pins its own dependencies; inputs and outputs travel as
``torch.save`` files read back with ``weights_only=True``.

Prints the largest absolute difference per case and exits 1 when one exceeds
``--tolerance`` (default 1e-4, the check the issue states).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

CASES = [  # (num_examples, reduce_non_diagonal_ratio)
    (12, 0.95),
    (12, 1.0),
    (7, 0.5),
    (1000, 0.95),  # more than the data: every batch is used
]


class TokenModel(nn.Module):
    """Linear maps over token inputs, a residual, a LayerNorm and a head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return self.head(self.norm(h)).mean(dim=1)


def make_inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    pre = {k: v.detach().clone() for k, v in TokenModel().state_dict().items()}
    fts = [{k: v + 0.2 * torch.randn(v.shape, generator=generator) for k, v in pre.items()} for _ in range(3)]
    sizes = [(5, 5, 5, 5), (4, 4, 4, 4), (3, 6, 2, 7)]  # rows per batch, per task
    data = [[{"x": torch.randn(rows, 3, 6, generator=generator)} for rows in task] for task in sizes]
    return pre, fts, data


class _Trainer:
    """What ``regmean_merging`` asks of a transformers Trainer: the batches, in order."""

    def __init__(self, batches):
        self.batches = batches
        self._train_batch_size = batches[0]["x"].shape[0]

    def get_train_dataloader(self):
        return list(self.batches)

    def _prepare_inputs(self, inputs):
        return inputs


def _prepare_fusion_bench_imports() -> None:
    """FusionBench imports torchvision (a CPU torch wheel here needs the
    toolkit's torchvision shim, loaded from this checkout without importing
    cl_merge) and, in 0.2.33, a name transformers 5 no longer has."""
    import importlib.util

    shim = Path(__file__).resolve().parents[1] / "cl_merge" / "_torchvision_compat.py"
    spec = importlib.util.spec_from_file_location("_cl_merge_torchvision_compat", shim)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    import transformers.models.clip.modeling_clip as modeling_clip

    if not hasattr(modeling_clip, "CLIPVisionTransformer"):
        modeling_clip.CLIPVisionTransformer = modeling_clip.CLIPVisionModel


def fusion_bench_side(inputs: Path, output: Path) -> None:
    _prepare_fusion_bench_imports()
    from fusion_bench.method.regmean.regmean import regmean_merging

    payload = torch.load(inputs, weights_only=True)
    results = []
    for num_examples, ratio in payload["cases"]:
        models = []
        for ft in payload["fts"]:
            model = TokenModel()
            model.load_state_dict(ft)
            models.append(model)
        merged = regmean_merging(models, [_Trainer(b) for b in payload["data"]], exclude_param_names_regex=[],
                                 nums_regmean_examples=[num_examples] * len(models),
                                 reduce_non_diagonal_ratio=ratio)
        results.append({k: v.detach().clone() for k, v in merged.items()})
    torch.save(results, output)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fb-python", default=sys.executable,
                        help="an interpreter with fusion_bench 0.2.x installed (default: this one)")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--fb-side", nargs=2, metavar=("INPUTS", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fb_side:
        fusion_bench_side(Path(args.fb_side[0]), Path(args.fb_side[1]))
        return 0

    import cl_merge

    pre, fts, data = make_inputs()
    with tempfile.TemporaryDirectory() as tmp:
        inputs, output = Path(tmp) / "inputs.pt", Path(tmp) / "fusion_bench.pt"
        torch.save({"fts": fts, "data": data, "cases": CASES}, inputs)
        done = subprocess.run([args.fb_python, str(Path(__file__).resolve()), "--fb-side", str(inputs), str(output)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "fusion_bench side failed")
            return 2
        reference = torch.load(output, weights_only=True)
    worst_overall = 0.0
    for (num_examples, ratio), theirs in zip(CASES, reference):
        ours = cl_merge.merge(pre, fts, method="regmean", model=TokenModel(), data=data,
                              num_examples=num_examples, reduce_non_diagonal_ratio=ratio)
        diffs = {k: float((ours[k] - v).abs().max()) for k, v in theirs.items()}
        worst_key = max(diffs, key=diffs.get)
        worst_overall = max(worst_overall, diffs[worst_key])
        # how far RegMean is from a plain average here: the agreement is not vacuous
        average = max(float((sum(ft[k] for ft in fts) / len(fts) - v).abs().max()) for k, v in theirs.items())
        print(f"num_examples={num_examples:<5} ratio={ratio:<5} max |ours - FusionBench| = {diffs[worst_key]:.2e} "
              f"({worst_key}; {len(diffs)} tensors; FusionBench vs plain average: {average:.2e})")
    verdict = "agree" if worst_overall <= args.tolerance else "DISAGREE"
    print(f"{verdict} within {args.tolerance:g}")
    return 0 if worst_overall <= args.tolerance else 1


if __name__ == "__main__":
    raise SystemExit(main())
