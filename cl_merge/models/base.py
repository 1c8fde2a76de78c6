"""The interface every model family implements, and the family registry.

A ``TaskModel`` splits a classifier into
- ``encoder``: the mergeable part (CLIP's image tower, a timm backbone without
  its head). ``encoder(images)`` returns pooled features; its state dict,
  with no prefix, is what task vectors are made of;
- heads: separate modules mapping features to logits (a frozen zero-shot head
  for CLIP, a trained linear head for ViT). Heads never enter an encoder
  state dict, so merging never mixes them.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import torch
from torch import nn

from cl_merge.errors import CheckpointError, HyperparameterError, UnknownNameError, close_matches
from cl_merge.models.clip_layouts import adapt_to_reference, layout_hint

Tensor = torch.Tensor
TrainableMode = Literal["all", "last_k_blocks", "layernorm"]


@dataclasses.dataclass
class ModelConfig:
    """What ``create_model`` needs; the ``model:`` section of configs.

    ``pretrained``: open_clip's tag or file path for CLIP (``"openai"``), a bool
    for timm. ``init_seed`` seeds the random initialisation of weights the
    checkpoint does not cover (all of them for ``pretrained: null``), so two
    processes building the same config get the same θ0.
    ``kwargs`` go to the family's factory (``create_clip``/``create_vit``).
    """

    family: str
    name: str
    pretrained: str | bool | None = None
    init_seed: int = 0
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        _ensure_families()
        if self.family not in MODEL_FAMILIES:
            raise UnknownNameError(
                f"unknown model family {self.family!r}{close_matches(self.family, MODEL_FAMILIES)}"
                f" (known: {', '.join(sorted(MODEL_FAMILIES))})"
            )


# ---------------------------------------------------------------------- helpers
@contextlib.contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Run model construction under ``seed`` without touching the caller's RNG
    (open_clip and timm initialise weights from the global generator)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def check_state_dict_fits(
    reference: Mapping[str, Tensor], state_dict: Mapping[str, Tensor], *, strict: bool = True, what: str = "encoder",
    source: str | None = None,
) -> None:
    """Raise ``CheckpointError`` naming the first key that does not fit; a
    checkpoint in a recognisably different layout (HF CLIP given to an
    open_clip model, ...) is named, with the command that converts it
    (``source``: its path, for that command)."""
    missing = [k for k in reference if k not in state_dict]
    unexpected = [k for k in state_dict if k not in reference]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), first {missing[0]!r}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), first {unexpected[0]!r}")
        hint = layout_hint(reference, state_dict, source) or _prefix_hint(reference, unexpected)
        raise CheckpointError(f"{what} state dict does not fit: {'; '.join(parts)}{hint}")
    for key, value in state_dict.items():
        ref = reference.get(key)
        if ref is not None and tuple(ref.shape) != tuple(value.shape):
            raise CheckpointError(
                f"{what} state dict does not fit: shape mismatch for {key!r}: "
                f"model has {list(ref.shape)}, state dict has {list(value.shape)}"
            )


def _prefix_hint(reference: Mapping[str, Tensor], unexpected: Sequence[str]) -> str:
    """A full-model state dict passed as an encoder one has keys like
    ``visual.conv1.weight``; say which prefix to strip."""
    if not unexpected:
        return ""
    first = unexpected[0]
    for i, ch in enumerate(first):
        if ch == "." and first[i + 1 :] in reference:
            return f" (keys look prefixed with {first[: i + 1]!r}; strip it)"
    return ""


def is_layernorm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__ in {"LayerNorm", "LayerNorm2d", "LayerNormFp32"}


# ---------------------------------------------------------------------- the interface
class TaskModel(abc.ABC):
    """A model family's encoder plus the knowledge to build heads and transforms.

    Subclasses set ``encoder``, ``feature_dim``, ``family``, ``name``,
    ``pretrained``, and the prefixes used to select trainable blocks.
    """

    family: str = ""
    head_trainable: bool = False  # CLIP's zero-shot head stays frozen, a ViT linear head trains
    block_prefixes: tuple[str, ...] = ()  # candidate paths of the block list inside the encoder
    post_block_prefixes: tuple[str, ...] = ()  # encoder entries applied after the blocks (final norm, projection)

    encoder: nn.Module
    feature_dim: int
    name: str
    pretrained: Any

    # -------------------------------------------------------------- weights
    def encoder_state_dict(self) -> dict[str, Tensor]:
        """Detached copies of the encoder's weights, keys without prefix."""
        return {k: v.detach().clone() for k, v in self.encoder.state_dict().items()}

    def load_encoder_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True) -> None:
        """Load encoder weights; a CLIP checkpoint in the other library's key
        layout (open_clip <-> Hugging Face) is converted on the way."""
        reference = self.encoder.state_dict()
        state_dict = adapt_to_reference(state_dict, reference)
        check_state_dict_fits(reference, state_dict, strict=strict, what=f"{self.name} encoder")
        self.encoder.load_state_dict(dict(state_dict), strict=strict)

    # -------------------------------------------------------------- heads
    @abc.abstractmethod
    def make_head(self, classnames: Sequence[str], templates: Sequence[str] | None = None) -> nn.Module:
        """A head mapping encoder features to ``len(classnames)`` logits."""

    def make_union_head(self, tasks: Sequence[tuple[Sequence[str], Sequence[str] | None]]) -> nn.Module:
        """One head over the classes of several tasks (class-incremental,
        task-agnostic evaluation): rows of each task's head, concatenated."""
        from cl_merge.models.heads import concat_heads

        return concat_heads([self.make_head(classnames, templates) for classnames, templates in tasks])

    def load_head(self, state_dict: Mapping[str, Tensor]) -> nn.Module:
        """Rebuild a head saved with ``head.state_dict()`` (``head.safetensors``)."""
        from cl_merge.models.heads import head_from_state_dict

        return head_from_state_dict(state_dict).to(self.device)

    # -------------------------------------------------------------- data
    @abc.abstractmethod
    def preprocess(self, train: bool = False) -> Callable:
        """The model's own image transform (PIL image -> tensor)."""

    # -------------------------------------------------------------- compute
    def forward(self, images: Tensor, head: nn.Module) -> Tensor:
        return head(self.encoder(images))

    __call__ = forward

    @property
    def device(self) -> torch.device:
        for tensor in self.encoder.state_dict().values():
            return tensor.device
        return torch.device("cpu")

    def to(self, device: str | torch.device) -> "TaskModel":
        self.encoder.to(device)
        return self

    def eval(self) -> "TaskModel":
        self.encoder.eval()
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.encoder.parameters())

    def describe(self) -> dict[str, Any]:
        """Identity for metadata files."""
        return {
            "family": self.family,
            "name": self.name,
            "pretrained": self.pretrained,
            "encoder_parameters": self.num_parameters(),
            "feature_dim": self.feature_dim,
        }

    # -------------------------------------------------------------- trainable subsets
    def block_prefix(self) -> str:
        for prefix in self.block_prefixes:
            with contextlib.suppress(AttributeError):
                blocks = self.encoder.get_submodule(prefix)
                if len(blocks) > 0:
                    return prefix
        raise HyperparameterError(
            f"trainable='last_k_blocks' needs a block list in {self.name}'s encoder; "
            f"none of {', '.join(self.block_prefixes) or '(no candidates)'} exists"
        )

    def trainable_parameter_names(self, mode: TrainableMode = "all", k: int = 1) -> list[str]:
        """Names (encoder-relative) of the parameters a fine-tune updates.

        ``all``: every encoder parameter. ``last_k_blocks``: the last ``k``
        transformer blocks plus what follows them (final norm, projection).
        ``layernorm``: the affine parameters of every LayerNorm.
        """
        names = [n for n, _ in self.encoder.named_parameters()]
        if mode == "all":
            return names
        if mode == "layernorm":
            chosen = []
            for mod_name, module in self.encoder.named_modules():
                if is_layernorm(module):
                    chosen += [f"{mod_name}.{p}" if mod_name else p for p, _ in module.named_parameters(recurse=False)]
            chosen_set = set(chosen)
            return [n for n in names if n in chosen_set]
        if mode == "last_k_blocks":
            if k < 1:
                raise HyperparameterError(f"trainable_k must be >= 1, got {k}")
            prefix = self.block_prefix()
            n_blocks = len(self.encoder.get_submodule(prefix))
            if k > n_blocks:
                raise HyperparameterError(f"trainable_k={k} but {self.name} has only {n_blocks} blocks")
            keep = tuple(f"{prefix}.{i}." for i in range(n_blocks - k, n_blocks))
            return [
                n for n in names
                if n.startswith(keep) or any(n == p or n.startswith(p + ".") for p in self.post_block_prefixes)
            ]
        raise HyperparameterError(f"unknown trainable mode {mode!r} (valid: all, last_k_blocks, layernorm)")


# ---------------------------------------------------------------------- registry
MODEL_FAMILIES: dict[str, Callable[..., TaskModel]] = {}


def register_family(name: str):
    def decorator(factory: Callable[..., TaskModel]):
        MODEL_FAMILIES[name] = factory
        return factory

    return decorator


def create_model(family: str, name: str, pretrained: str | bool | None = None, **kwargs: Any) -> TaskModel:
    """Build a ``TaskModel`` of ``family`` ("clip", "hf_clip" or "vit")."""
    _ensure_families()
    factory = MODEL_FAMILIES.get(family)
    if factory is None:
        raise UnknownNameError(
            f"unknown model family {family!r}{close_matches(family, MODEL_FAMILIES)}"
            f" (known: {', '.join(sorted(MODEL_FAMILIES))})"
        )
    return factory(name, pretrained, **kwargs)


def build_model(config: ModelConfig, **overrides: Any) -> TaskModel:
    """``create_model`` from a ``ModelConfig`` (``overrides`` e.g. ``device=``)."""
    kwargs = {**config.kwargs, **overrides}
    kwargs.setdefault("init_seed", config.init_seed)
    return create_model(config.family, config.name, config.pretrained, **kwargs)


def _ensure_families() -> None:
    # the family modules register themselves on import
    import cl_merge.models.clip  # noqa: F401
    import cl_merge.models.hf_clip  # noqa: F401  (transformers is imported on first use)
    import cl_merge.models.vit  # noqa: F401
