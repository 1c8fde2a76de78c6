"""CLIP through open_clip: the image tower is the mergeable encoder, the text
tower only builds frozen zero-shot heads.

The toolkit registers small configs (``cl_merge/models/model_configs/*.json``,
model name = file stem) so everything runs offline on a CPU:
``clmerge-tiny-clip`` (32 px, 4.1M parameters) and ``clmerge-small-clip`` (64 px).
Any open_clip model name and pretrained tag works where weights can be
downloaded (``create_clip("ViT-B-32", "openai")``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import cl_merge._torchvision_compat  # noqa: F401  (before open_clip imports torchvision)
import open_clip
import torch
from torch import nn

from cl_merge.errors import CheckpointError, UnknownNameError, close_matches
from cl_merge.models.base import TaskModel, register_family, seeded_init
from cl_merge.models.heads import (
    HeadCache,
    ZeroShotHead,
    build_zero_shot_weight,
    check_templates,
    default_head_cache_dir,
    fingerprint_tensors,
    head_cache_key,
)

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
TOOLKIT_MODELS = tuple(sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json")))
DEFAULT_TEMPLATES = ("a photo of a {}.",)
open_clip.add_model_config(MODEL_CONFIG_DIR)


class ClipModel(TaskModel):
    """An open_clip model seen as (image encoder, zero-shot heads)."""

    family = "clip"
    head_trainable = False
    block_prefixes = ("transformer.resblocks", "trunk.blocks", "trunk.stages")
    post_block_prefixes = ("ln_post", "proj", "attn_pool", "head", "trunk.norm", "trunk.fc_norm", "trunk.head")

    def __init__(
        self,
        clip: nn.Module,
        *,
        name: str,
        pretrained: str | None,
        preprocess_train: Callable,
        preprocess_val: Callable,
        tokenizer: Callable,
        head_cache_dir: str | Path | None = None,
        init_seed: int = 0,
    ):
        self.clip = clip.eval()
        self.encoder = clip.visual
        self.name = name
        self.pretrained = pretrained
        self.init_seed = init_seed
        self.tokenizer = tokenizer
        self._preprocess = {True: preprocess_train, False: preprocess_val}
        self.head_cache = HeadCache(head_cache_dir)
        self.feature_dim = int(clip.visual.output_dim)
        self._weights_id: str | None = None
        for param in self.text_parameters():
            param.requires_grad_(False)

    # -------------------------------------------------------------- text side
    def text_parameters(self):
        visual = {id(p) for p in self.encoder.parameters()}
        return [p for p in self.clip.parameters() if id(p) not in visual]

    def weights_id(self) -> str:
        """What identifies the text tower's weights: the pretrained tag, or a
        fingerprint of the weights (random init, or a local file that may change)."""
        if self._weights_id is None:
            if isinstance(self.pretrained, str) and self.pretrained in _known_tags(self.name):
                # heads built under GELU (before QuickGELU was chosen for these weights) must not be reused
                self._weights_id = f"tag:{self.pretrained}" + (":quickgelu" if self.quick_gelu else "")
            else:
                text_state = {k: v for k, v in self.clip.state_dict().items() if not k.startswith("visual.")}
                self._weights_id = f"sha256:{fingerprint_tensors(text_state)}"
        return self._weights_id

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(tokens)

    def make_head(self, classnames: Sequence[str], templates: Sequence[str] | None = None) -> ZeroShotHead:
        """Frozen zero-shot head over ``classnames`` (cached; the text tower
        runs only on a cache miss)."""
        templates = check_templates(templates if templates is not None else DEFAULT_TEMPLATES)
        classnames = [str(c) for c in classnames]
        key = head_cache_key(self.name, self.weights_id(), classnames, templates)
        device = self.device

        def build() -> torch.Tensor:
            self.clip.eval()
            return build_zero_shot_weight(self.encode_text, self.tokenizer, classnames, templates, device=device)

        weight = self.head_cache.get_or_build(
            key, build, {"model": self.name, "num_classes": str(len(classnames))}
        )
        return ZeroShotHead(weight, self.clip.logit_scale.detach().cpu()).to(device)

    # -------------------------------------------------------------- rest of the interface
    def preprocess(self, train: bool = False) -> Callable:
        return self._preprocess[bool(train)]

    def to(self, device: str | torch.device) -> "ClipModel":
        self.clip.to(device)
        return self

    @property
    def quick_gelu(self) -> bool:
        return uses_quick_gelu(self.clip)

    def describe(self) -> dict[str, Any]:
        # named only when set, so the identity (and fine-tune config hashes) of GELU models stays as it was
        return {**super().describe(), "init_seed": self.init_seed, **({"quick_gelu": True} if self.quick_gelu else {})}


def _known_tags(name: str) -> list[str]:
    try:
        return list(open_clip.list_pretrained_tags_by_model(name))
    except Exception:  # names open_clip resolves elsewhere (hf-hub:...)
        return []


def needs_quick_gelu(name: str, pretrained: str | None) -> bool:
    """Whether ``name`` + ``pretrained`` must be built with QuickGELU: the
    OpenAI CLIP weights (and the other tags open_clip's pretrained registry
    marks ``quick_gelu``: LAION-400M ViT-B-32, MetaCLIP, DFN, ...) were trained
    with it, while open_clip 3.x builds e.g. ``ViT-B-32`` with GELU. A name
    ending in ``-quickgelu`` already has it; a local weights file carries no
    such information (pass ``force_quick_gelu=True`` for OpenAI weights)."""
    if not isinstance(pretrained, str) or not pretrained or name.endswith("-quickgelu") or _is_hub_name(name):
        return False
    if pretrained not in _known_tags(name):
        return False
    from open_clip.pretrained import get_pretrained_cfg

    return bool(get_pretrained_cfg(name, pretrained).get("quick_gelu", False))


def uses_quick_gelu(module: nn.Module) -> bool:
    return any(type(m).__name__ == "QuickGELU" for m in module.modules())


def _foreign_layout_weights(path: str) -> dict[str, torch.Tensor] | None:
    """A weights file or folder open_clip cannot read itself, converted to
    open_clip's names: Hugging Face CLIP, task-vectors' pickled ImageEncoder.
    None for open_clip's own layout (and anything unrecognised), which
    open_clip loads as before."""
    from cl_merge.core.io import open_checkpoint
    from cl_merge.core.pickle_import import load_checkpoint_tensors
    from cl_merge.models.clip_layouts import convert_layout, detect_layout

    file = Path(path)
    if file.is_dir() or file.suffix == ".safetensors":
        with open_checkpoint(file) as reader:  # safetensors: keys only, nothing read yet
            if detect_layout(reader.keys()) in ("open_clip", "unknown"):
                return None
    state = load_checkpoint_tensors(file)
    if detect_layout(state) in ("open_clip", "unknown"):
        return None
    return convert_layout(state, "open_clip")


def _is_hub_name(name: str) -> bool:
    return name.startswith(("hf-hub:", "local-dir:"))


def _offline_reason() -> str:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:
        return "HF_HUB_OFFLINE is set, so nothing is fetched from the Hugging Face Hub"
    return "no network connection to the Hugging Face Hub (or the download failed)"


@register_family("clip")
def create_clip(
    name: str,
    pretrained: str | None = None,
    *,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    init_seed: int = 0,
    head_cache_dir: str | Path | None = "default",
    precision: str = "fp32",
    **open_clip_kwargs: Any,
) -> ClipModel:
    """Create an open_clip model; ``pretrained`` is passed to open_clip as is
    (a tag such as ``"openai"``, a local file, or ``None`` for random init).
    A tag trained with QuickGELU (``openai``, see :func:`needs_quick_gelu`)
    builds the QuickGELU variant unless ``force_quick_gelu`` says otherwise.

    ``cache_dir``: open_clip's weights cache. ``head_cache_dir``: where
    zero-shot heads are cached on disk (``"default"``: ``$CL_MERGE_CACHE_DIR``
    or ``~/.cache/cl_merge``; ``None``: memory only).
    """
    if pretrained is False:
        pretrained = None
    if pretrained is True:
        raise UnknownNameError(
            f"pretrained=True is ambiguous for CLIP model {name!r}; name a tag "
            f"(available: {', '.join(_known_tags(name)) or 'none'})"
        )
    if not _is_hub_name(name):
        models = open_clip.list_models()
        if name not in models:
            raise UnknownNameError(f"unknown CLIP model {name!r}{close_matches(name, models)} (see open_clip.list_models())")
        if pretrained and not Path(pretrained).exists():
            tags = _known_tags(name)
            if pretrained not in tags:
                raise UnknownNameError(
                    f"unknown pretrained tag {pretrained!r} for CLIP model {name!r} and no such file"
                    f"{close_matches(pretrained, tags)} (available: {', '.join(tags) or 'none'})"
                )
    foreign = _foreign_layout_weights(pretrained) if pretrained and Path(pretrained).exists() else None
    if foreign is not None:
        pretrained_arg, weights_file = None, pretrained  # open_clip cannot read it; loaded below
    else:
        pretrained_arg, weights_file = pretrained, None
    if open_clip_kwargs.get("force_quick_gelu") is None:
        # the weights' own activation; open_clip would otherwise build GELU and warn
        open_clip_kwargs["force_quick_gelu"] = needs_quick_gelu(name, pretrained)
    try:
        with seeded_init(init_seed):
            clip, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
                name,
                pretrained=pretrained_arg,
                cache_dir=str(cache_dir) if cache_dir is not None else None,
                device=device,
                precision=precision,
                **open_clip_kwargs,
            )
    except RuntimeError as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "download" in message.lower() or "connection" in message.lower() or "hub" in message.lower():
            raise CheckpointError(
                f"could not download pretrained weights {pretrained!r} for CLIP model {name!r}: "
                f"{_offline_reason()}; run once with network access (or pass a local weights file as pretrained) "
                f"[{message[:200]}]"
            ) from None
        raise CheckpointError(f"could not create CLIP model {name!r} (pretrained={pretrained!r}): {message[:300]}") from None
    except OSError as exc:  # huggingface_hub's offline / not-found errors
        raise CheckpointError(
            f"could not download pretrained weights {pretrained!r} for CLIP model {name!r}: {_offline_reason()} "
            f"[{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}]"
        ) from None
    if foreign is not None:
        from cl_merge.models.base import check_state_dict_fits

        check_state_dict_fits(clip.state_dict(), foreign, what=f"pretrained weights {weights_file}", source=weights_file)
        clip.load_state_dict(foreign)
    tokenizer = open_clip.get_tokenizer(name)
    if head_cache_dir == "default":
        head_cache_dir = default_head_cache_dir()
    return ClipModel(
        clip,
        name=name,
        pretrained=pretrained,
        preprocess_train=preprocess_train,
        preprocess_val=preprocess_val,
        tokenizer=tokenizer,
        head_cache_dir=head_cache_dir,
        init_seed=init_seed,
    )
