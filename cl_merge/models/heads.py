"""Classification heads, kept outside the encoder so merging never touches them.

Zero-shot heads (Radford et al., 2021): for each class, every template is
filled with the class name, encoded by the frozen text tower and
L2-normalised; the embeddings are averaged over templates and renormalised.
Logits are ``logit_scale.exp() * normalise(image_features) @ head.T``.

Building a head runs the text tower over classes × templates (80k prompts
for ImageNet), so heads are cached in memory and on disk (safetensors,
written atomically), keyed by a hash of the model name, the weights' identity
(pretrained tag or a fingerprint of the text-tower weights), the class list
and the templates.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cl_merge.core.io import load_state_dict, save_state_dict
from cl_merge.errors import CheckpointError, ConfigError

Tensor = torch.Tensor
log = logging.getLogger(__name__)

HEAD_FORMAT_VERSION = 1
MEMORY_CACHE_SIZE = 64
CACHE_DIR_ENV = "CL_MERGE_CACHE_DIR"


class ZeroShotHead(nn.Module):
    """Frozen head: ``weight`` [num_classes, embed_dim] of unit rows, and
    CLIP's (log-space) ``logit_scale``. Both are buffers, so an optimizer
    never sees them."""

    def __init__(self, weight: Tensor, logit_scale: Tensor | float):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone().float())
        self.register_buffer("logit_scale", torch.as_tensor(logit_scale, dtype=torch.float32).detach().clone().reshape(()))

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def forward(self, features: Tensor) -> Tensor:
        features = F.normalize(features.float(), dim=-1)
        return self.logit_scale.exp() * features @ self.weight.T

    def extra_repr(self) -> str:
        return f"num_classes={self.weight.shape[0]}, embed_dim={self.weight.shape[1]}"


def head_from_state_dict(state_dict: Mapping[str, Tensor]) -> nn.Module:
    """Rebuild a ``ZeroShotHead`` or ``nn.Linear`` from its state dict."""
    keys = set(state_dict)
    if keys == {"weight", "logit_scale"}:
        return ZeroShotHead(state_dict["weight"], state_dict["logit_scale"])
    if keys in ({"weight", "bias"}, {"weight"}):
        weight = state_dict["weight"]
        if weight.ndim != 2:
            raise CheckpointError(f"linear head weight must be 2-D, got shape {list(weight.shape)}")
        head = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in keys)
        head.load_state_dict(dict(state_dict))
        return head
    raise CheckpointError(f"not a head state dict: keys {sorted(keys)} (expected weight[, bias] or weight, logit_scale)")


def concat_heads(heads: Sequence[nn.Module]) -> nn.Module:
    """Union head: the classes of each head in order (class-incremental)."""
    if not heads:
        raise ConfigError("concat_heads needs at least one head")
    if all(isinstance(h, ZeroShotHead) for h in heads):
        scales = {float(h.logit_scale) for h in heads}
        if len(scales) > 1:
            raise ConfigError(f"zero-shot heads with different logit scales cannot be joined: {sorted(scales)}")
        return ZeroShotHead(torch.cat([h.weight for h in heads]), heads[0].logit_scale)
    if all(isinstance(h, nn.Linear) for h in heads):
        dims = {h.in_features for h in heads}
        if len(dims) > 1:
            raise ConfigError(f"linear heads have different input sizes {sorted(dims)}")
        has_bias = all(h.bias is not None for h in heads)
        out = nn.Linear(heads[0].in_features, sum(h.out_features for h in heads), bias=has_bias)
        with torch.no_grad():
            out.weight.copy_(torch.cat([h.weight for h in heads]))
            if has_bias:
                out.bias.copy_(torch.cat([h.bias for h in heads]))
        return out.to(heads[0].weight.device)
    raise ConfigError(f"cannot join heads of types {sorted({type(h).__name__ for h in heads})}")


def fit_linear_head(features: Tensor, labels: Tensor, num_classes: int, *, weight_decay: float = 1e-3,
                    max_iter: int = 100) -> nn.Linear:
    """Multinomial logistic regression on fixed features (a linear probe).

    Features are standardised per dimension (z = (x - mean) / std); on z,
    mean cross-entropy + ``weight_decay``·‖W_z‖² is minimised from zero with
    full-batch L-BFGS, and the result is folded back into a head on the raw
    features (W = W_z / std, b = b_z - W·mean). The objective is strictly
    convex, so the head depends on no seed or data order; standardising keeps
    L-BFGS well conditioned whatever the feature scale."""
    features = features.detach().float()
    labels = torch.as_tensor(labels, dtype=torch.long)
    if features.ndim != 2 or len(features) != len(labels) or len(labels) == 0:
        raise ConfigError(f"fit_linear_head needs [N, D] features and N labels, got {list(features.shape)} "
                          f"and {len(labels)}")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ConfigError(f"labels must be in 0..{num_classes - 1}")
    mean = features.mean(0)
    std = features.std(0, unbiased=False).clamp_min(1e-6)
    z = (features - mean) / std
    probe = nn.Linear(features.shape[1], num_classes)
    nn.init.zeros_(probe.weight)
    nn.init.zeros_(probe.bias)
    optimizer = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=max_iter, tolerance_grad=1e-7,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(z), labels) + weight_decay * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    head = nn.Linear(features.shape[1], num_classes)
    with torch.no_grad():
        head.weight.copy_(probe.weight / std)
        head.bias.copy_(probe.bias - head.weight @ mean)
    return head


# ---------------------------------------------------------------------- building
def check_templates(templates: Sequence[str]) -> list[str]:
    templates = list(templates)
    if not templates:
        raise ConfigError("a zero-shot head needs at least one template")
    for template in templates:
        if not isinstance(template, str) or template.count("{}") != 1:
            raise ConfigError(f"template {template!r} must be a string with exactly one '{{}}' placeholder")
    return templates


@torch.inference_mode()
def build_zero_shot_weight(
    encode_text: Callable[[Tensor], Tensor],
    tokenizer: Callable[[list[str]], Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
) -> Tensor:
    """[num_classes, embed_dim] unit rows: per class, the renormalised mean of
    the normalised text embeddings of every template."""
    templates = check_templates(templates)
    per_batch = max(1, batch_size // len(templates))  # whole classes per text batch
    rows = []
    for start in range(0, len(classnames), per_batch):
        chunk = classnames[start : start + per_batch]
        texts = [t.format(c) for c in chunk for t in templates]
        emb = encode_text(tokenizer(texts).to(device)).float()
        emb = F.normalize(emb, dim=-1).reshape(len(chunk), len(templates), -1).mean(dim=1)
        rows.append(F.normalize(emb, dim=-1))
    return torch.cat(rows).cpu()


def head_cache_key(model_name: str, weights_id: str, classnames: Sequence[str], templates: Sequence[str]) -> str:
    payload = json.dumps(
        {
            "format": HEAD_FORMAT_VERSION,
            "model": model_name,
            "weights": weights_id,
            "classnames": list(classnames),
            "templates": list(templates),
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def default_head_cache_dir() -> Path:
    """``$CL_MERGE_CACHE_DIR/zeroshot_heads``, else ``~/.cache/cl_merge/zeroshot_heads``."""
    root = os.environ.get(CACHE_DIR_ENV)
    base = Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cl_merge"
    return base / "zeroshot_heads"


class HeadCache:
    """Two-level cache of zero-shot head weights: a process-wide LRU in memory,
    then one safetensors file per key under ``cache_dir`` (``None``: memory only)."""

    _memory: "OrderedDict[str, Tensor]" = OrderedDict()

    def __init__(self, cache_dir: str | Path | None):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None

    @classmethod
    def clear_memory(cls) -> None:
        cls._memory.clear()

    def path(self, key: str) -> Path | None:
        return self.cache_dir / f"{key}.safetensors" if self.cache_dir is not None else None

    def get(self, key: str) -> Tensor | None:
        weight = self._memory.get(key)
        if weight is not None:
            self._memory.move_to_end(key)
            return weight
        path = self.path(key)
        if path is None or not path.exists():
            return None
        try:
            weight = load_state_dict(path)["weight"]
        except (CheckpointError, KeyError) as exc:
            log.warning("ignoring unreadable cached head %s (%s); rebuilding it", path, exc)
            return None
        self._remember(key, weight)
        return weight

    def put(self, key: str, weight: Tensor, metadata: Mapping[str, str] | None = None) -> None:
        self._remember(key, weight)
        path = self.path(key)
        if path is not None:
            save_state_dict({"weight": weight}, path, {"cl_merge_kind": "zeroshot_head", **(metadata or {})})

    def _remember(self, key: str, weight: Tensor) -> None:
        self._memory[key] = weight
        self._memory.move_to_end(key)
        while len(self._memory) > MEMORY_CACHE_SIZE:
            self._memory.popitem(last=False)

    def get_or_build(self, key: str, build: Callable[[], Tensor], metadata: Mapping[str, str] | None = None) -> Tensor:
        weight = self.get(key)
        if weight is None:
            weight = build()
            self.put(key, weight, metadata)
        return weight


def fingerprint_tensors(tensors: Mapping[str, Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes (sorted keys)."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy())  # buffer protocol: no copy
    return digest.hexdigest()
