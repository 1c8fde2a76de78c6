"""Data, heads and accuracy for the runner, each built once and reused.

Test splits are streamed through a DataLoader at every evaluation (images
decoded and transformed in its workers): no task's test tensors stay in
memory, so memory does not grow with the number or size of the tasks.
Zero-shot heads are cached (small: classes x embedding); evaluating a merged
model only swaps encoder weights. The pool puts the model on the device the
run is configured for when it is built, so evaluation runs there whether or
not a fine-tune ran in this process (resume, imported checkpoints, --stage).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from cl_merge.data import TaskSpec, load_task
from cl_merge.lit.evaluate import _TransformCollate, autocast_for, enable_tf32, resolve_device

Tensor = torch.Tensor


def stage_task_spec(stage, scenario) -> TaskSpec:
    return TaskSpec(
        dataset=stage.dataset,
        name=stage.name,
        classes=list(stage.classes) if stage.classes is not None else None,
        variant=stage.variant,
        k_shot=stage.k_shot,
        max_train=scenario.train.max_train,
        max_test=scenario.eval.max_test,
        max_val=scenario.eval.max_test,
        layout=getattr(stage, "layout", None),
    )


class TaskPool:
    """Loaded tasks of a scenario and a reusable model for evaluation.

    ``device``: a torch device, or None for the one ``accelerator``/``devices``
    give (``auto``: the first GPU if any, else the CPU); the model is moved
    there now. ``precision``: a Lightning precision string; ``bf16-mixed``
    (and ``bf16-true``) evaluate under bfloat16 autocast. TF32 matmuls are on
    for CUDA devices. ``num_workers``: DataLoader workers that decode and
    transform the test images.
    """

    def __init__(self, scenario, model, *, data_root=None, download: bool = False,
                 head_loader: Callable[[int, str], nn.Module | None] | None = None,
                 device: str | torch.device | None = None, accelerator: str = "auto", devices=None,
                 precision: str | int | None = None, num_workers: int = 0):
        self.scenario = scenario
        self.device = torch.device(device) if device is not None else resolve_device(accelerator, devices)
        enable_tf32(self.device)
        self.model = model.to(self.device).eval()
        self.precision = precision
        self.num_workers = num_workers
        self.theta0 = {k: v.cpu() for k, v in model.encoder_state_dict().items()}
        self.data_root = data_root
        self.download = download
        self.head_loader = head_loader
        self.batch_size = scenario.eval.batch_size
        self._tasks: dict[str, object] = {}
        self._heads: dict[tuple, nn.Module] = {}

    # ------------------------------------------------------------ data
    def task(self, stage):
        if stage.name not in self._tasks:
            self._tasks[stage.name] = load_task(stage_task_spec(stage, self.scenario), self.data_root,
                                                download=self.download, seed=self.scenario.seed)
        return self._tasks[stage.name]

    def loader(self, stage, split: str) -> DataLoader:
        """The split, streamed in batches of ``eval.batch_size`` through the model's evaluation transform."""
        data = getattr(self.task(stage), split)
        return DataLoader(data, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          pin_memory=self.device.type == "cuda",
                          collate_fn=_TransformCollate(self.model.preprocess(train=False)))

    # ------------------------------------------------------------ heads
    def head(self, stages: Sequence, index: int, seen_upto: int) -> tuple[nn.Module, int]:
        """Head for task ``index`` and the offset of its labels in that head.
        Class-incremental: one union head over the classes of every task seen
        up to ``seen_upto`` (task-agnostic). Otherwise the task's own head."""
        if self.scenario.setting == "class_incremental":
            key = ("union", tuple(s.name for s in stages[: seen_upto + 1]))
            if key not in self._heads:
                parts = [self._own_head(stages, j) for j in range(seen_upto + 1)]
                from cl_merge.models.heads import concat_heads

                self._heads[key] = concat_heads(parts).to(self.device)
            offset = sum(self.task(stages[j]).num_classes for j in range(index))
            return self._heads[key], offset
        return self._own_head(stages, index), 0

    def _own_head(self, stages: Sequence, index: int) -> nn.Module:
        stage = stages[index]
        key = ("own", stage.name)
        if key not in self._heads:
            head = self.head_loader(index, stage.name) if self.head_loader is not None else None
            if head is None:
                task = self.task(stage)
                head = self.model.make_head(task.classnames, task.templates)
            self._heads[key] = head.to(self.device).eval()
        return self._heads[key]

    # ------------------------------------------------------------ accuracy
    @torch.no_grad()
    def _correct_counts(self, stage, split: str, heads: Sequence[tuple[nn.Module, int]]) -> tuple[list[int], int]:
        """Correct predictions of each ``(head, label offset)`` over one streamed pass."""
        correct, total = [0] * len(heads), 0
        for images, labels in self.loader(stage, split):
            images = images.to(self.device, non_blocking=True)
            with autocast_for(self.device, self.precision):
                features = self.model.encoder(images)
                predictions = [head(features).argmax(dim=-1).cpu() for head, _ in heads]
            for j, (pred, (_, offset)) in enumerate(zip(predictions, heads)):
                correct[j] += int((pred == labels + offset).sum())
            total += len(labels)
        return correct, total

    def accuracy(self, encoder_state, stages: Sequence, index: int, seen_upto: int,
                 split: str = "test", wrap_head: Callable[[nn.Module], nn.Module] | None = None) -> dict[str, float]:
        """Accuracy (a fraction in [0, 1]) on task ``index`` with the given encoder weights.
        Class-incremental runs add ``<task>/task_aware`` (the task's own head).
        ``wrap_head``: a merge result's per-task module between the encoder
        and the head (Representation Surgery's adapters)."""
        self.model.load_encoder_state_dict(encoder_state)
        self.model.eval()
        stage = stages[index]
        wrap = wrap_head if wrap_head is not None else (lambda head: head)
        head, offset = self.head(stages, index, max(seen_upto, index))
        heads = [(wrap(head), offset)]
        task_aware = self.scenario.setting == "class_incremental" and self.scenario.eval.task_aware
        if task_aware:
            heads.append((wrap(self._own_head(stages, index)), 0))
        correct, total = self._correct_counts(stage, split, heads)
        out = {stage.name: correct[0] / max(1, total)}
        if task_aware:
            out[f"{stage.name}/task_aware"] = correct[1] / max(1, total)
        return out
