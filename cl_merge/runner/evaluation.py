"""Data, heads and accuracy for the runner, each built once and reused.

Test tensors are preprocessed once per task; zero-shot heads come from the
model's head cache (the text tower is not run again after the first build);
evaluating a merged model only swaps encoder weights.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from cl_merge.data import TaskSpec, cache_tensors, load_task

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
    )


class TaskPool:
    """Loaded tasks of a scenario and a reusable model for evaluation."""

    def __init__(self, scenario, model, *, data_root=None, download: bool = False,
                 head_loader: Callable[[int, str], nn.Module | None] | None = None):
        self.scenario = scenario
        self.model = model.eval()
        self.theta0 = model.encoder_state_dict()
        self.data_root = data_root
        self.download = download
        self.head_loader = head_loader
        self.batch_size = scenario.eval.batch_size
        self._tasks: dict[str, object] = {}
        self._tensors: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}
        self._heads: dict[tuple, nn.Module] = {}

    # ------------------------------------------------------------ data
    def task(self, stage):
        if stage.name not in self._tasks:
            self._tasks[stage.name] = load_task(stage_task_spec(stage, self.scenario), self.data_root,
                                                download=self.download, seed=self.scenario.seed)
        return self._tasks[stage.name]

    def tensors(self, stage, split: str) -> tuple[Tensor, Tensor]:
        key = (stage.name, split)
        if key not in self._tensors:
            data = getattr(self.task(stage), split)
            cached = cache_tensors(data, self.model.preprocess(train=False))
            self._tensors[key] = (cached.inputs, torch.as_tensor(cached.labels))
        return self._tensors[key]

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

                self._heads[key] = concat_heads(parts)
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
            self._heads[key] = head.eval()
        return self._heads[key]

    # ------------------------------------------------------------ accuracy
    @torch.no_grad()
    def _predict_accuracy(self, head: nn.Module, inputs: Tensor, labels: Tensor, offset: int) -> float:
        correct = 0
        device = self.model.device
        for start in range(0, len(labels), self.batch_size):
            batch = inputs[start:start + self.batch_size].to(device)
            logits = self.model.forward(batch, head)
            pred = logits.argmax(dim=-1).cpu()
            correct += int((pred == labels[start:start + self.batch_size] + offset).sum())
        return correct / max(1, len(labels))

    def accuracy(self, encoder_state, stages: Sequence, index: int, seen_upto: int,
                 split: str = "test") -> dict[str, float]:
        """Accuracy (a fraction in [0, 1]) on task ``index`` with the given encoder weights.
        Class-incremental runs add ``<task>/task_aware`` (the task's own head)."""
        self.model.load_encoder_state_dict(encoder_state)
        self.model.eval()
        stage = stages[index]
        inputs, labels = self.tensors(stage, split)
        head, offset = self.head(stages, index, max(seen_upto, index))
        out = {stage.name: self._predict_accuracy(head, inputs, labels, offset)}
        if self.scenario.setting == "class_incremental" and self.scenario.eval.task_aware:
            out[f"{stage.name}/task_aware"] = self._predict_accuracy(self._own_head(stages, index), inputs, labels, 0)
        return out
