"""CLIP through Hugging Face ``transformers`` (the layout of FusionBench's
model pools): ``create_model("hf_clip", "openai/clip-vit-base-patch32")``.

- ``name``: a hub id or a local folder written by ``save_pretrained``
  (``config.json`` + weights). Nothing is ever executed from it
  (``trust_remote_code=False``); with ``HF_HUB_OFFLINE=1`` only the local
  Hugging Face cache is read.
- The encoder is the vision tower plus ``visual_projection``, so
  ``encoder(images)`` equals ``CLIPModel.get_image_features(images)``; its
  state dict has the ``CLIPModel`` key names (``vision_model.*``,
  ``visual_projection.weight``).
- Zero-shot heads come from the frozen text tower exactly as for open_clip
  (:class:`cl_merge.models.clip.ClipModel`, cached the same way).
- A vision-only ``CLIPVisionModel`` checkpoint (FusionBench's
  ``tanganke/clip-vit-base-patch32_<task>``: no ``visual_projection``) is
  loaded as the encoder's vision tower; the text tower and the projection come
  from the base model it was fine-tuned from (``base=``; in a scenario,
  ``model.pretrained`` names the base for this family).
- The image transform is CLIP's (the checkpoint's ``preprocessor_config.json``:
  resize the shortest side, centre crop, normalise with its mean/std), built
  from torchvision transforms, so no processor download is needed; without
  that file the OpenAI CLIP statistics and the model's image size are used.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from cl_merge.errors import CheckpointError
from cl_merge.models.base import register_family, seeded_init
from cl_merge.models.clip import ClipModel
from cl_merge.models.clip_layouts import adapt_to_reference
from cl_merge.models.heads import HeadCache, default_head_cache_dir, fingerprint_tensors

# transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD, the defaults of CLIPImageProcessor
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_PIL_BICUBIC = 3


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def _features(output) -> torch.Tensor:
    """transformers 5 wraps pooled outputs in a model output; 4.x returned tensors."""
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


class HFClipImageEncoder(nn.Module):
    """``visual_projection(vision_model(images).pooler_output)``: the
    mergeable part of a ``CLIPModel`` (its modules, shared, not copied)."""

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Linear):
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection
        self.output_dim = int(visual_projection.out_features)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(_features(self.vision_model(pixel_values=pixel_values)))


def _to_rgb(image):
    return image.convert("RGB") if hasattr(image, "convert") else image


def clip_image_transform(processor_config: dict | None, image_size: int) -> Callable:
    """CLIPImageProcessor's deterministic pipeline as torchvision transforms."""
    from torchvision import transforms as T

    cfg = processor_config or {}
    size = cfg.get("size", image_size)
    if isinstance(size, dict):
        size = size.get("shortest_edge") or min(size.get("height", image_size), size.get("width", image_size))
    crop = cfg.get("crop_size", image_size)
    if isinstance(crop, dict):
        crop = (crop.get("height", image_size), crop.get("width", image_size))
    interpolation = {0: T.InterpolationMode.NEAREST, 2: T.InterpolationMode.BILINEAR}.get(
        cfg.get("resample", _PIL_BICUBIC), T.InterpolationMode.BICUBIC)
    steps: list[Callable] = []
    if cfg.get("do_convert_rgb", True):
        steps.append(_to_rgb)
    if cfg.get("do_resize", True):
        steps.append(T.Resize(int(size), interpolation=interpolation))
    if cfg.get("do_center_crop", True):
        steps.append(T.CenterCrop(crop))
    steps.append(T.ToTensor())  # rescale by 1/255
    if cfg.get("do_normalize", True):
        steps.append(T.Normalize(cfg.get("image_mean", OPENAI_CLIP_MEAN), cfg.get("image_std", OPENAI_CLIP_STD)))
    return T.Compose(steps)


# ---------------------------------------------------------------------- the model


class HFClipModel(ClipModel):
    """A ``transformers`` ``CLIPModel`` seen as (image encoder, zero-shot heads).

    Heads, caching and the text side follow :class:`ClipModel`; only the
    modules and the tokenizer differ."""

    family = "hf_clip"
    block_prefixes = ("vision_model.encoder.layers",)
    post_block_prefixes = ("vision_model.post_layernorm", "visual_projection")

    def __init__(self, clip: nn.Module, *, name: str, base: str | None, tokenizer: Callable, preprocess: Callable,
                 head_cache_dir: str | Path | None = None, init_seed: int = 0):
        self.clip = clip.eval()
        self.encoder = HFClipImageEncoder(clip.vision_model, clip.visual_projection)
        self.name = name
        self.base = base
        self.pretrained = base
        self.init_seed = init_seed
        self.tokenizer = tokenizer
        self._preprocess = {True: preprocess, False: preprocess}  # CLIP fine-tuning recipes use the eval transform
        self.head_cache = HeadCache(head_cache_dir)
        self.feature_dim = self.encoder.output_dim
        self._weights_id = None
        for param in self.text_parameters():
            param.requires_grad_(False)

    def weights_id(self) -> str:
        if self._weights_id is None:
            text_state = {k: v for k, v in self.clip.state_dict().items()
                          if k.startswith(("text_model.", "text_projection.", "logit_scale"))}
            self._weights_id = f"hf-sha256:{fingerprint_tensors(text_state)}"
        return self._weights_id

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return _features(self.clip.get_text_features(input_ids=tokens))

    @property
    def quick_gelu(self) -> bool:
        return getattr(self.clip.config.vision_config, "hidden_act", None) == "quick_gelu"

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "base": self.base}


class _Tokenize:
    """``tokenizer(texts) -> input ids`` padded to the longest text (CLIP pools
    at the first end-of-text token and its mask is causal, so padding after it
    does not change the features)."""

    def __init__(self, tokenizer, context_length: int):
        self.tokenizer = tokenizer
        self.context_length = context_length

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        encoded = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.context_length,
                                 return_tensors="pt")
        return encoded["input_ids"]


# ---------------------------------------------------------------------- loading
def _is_local(name: str) -> bool:
    path = Path(os.path.expanduser(name))
    return path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1


def _load_error(name: str, exc: BaseException, what: str = "model") -> CheckpointError:
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    if _is_local(name):
        path = Path(os.path.expanduser(name))
        if not path.exists():
            return CheckpointError(f"hf_clip {what} folder not found: {name}")
        return CheckpointError(f"cannot load hf_clip {what} from {name} (a save_pretrained folder with config.json "
                               f"and weights is expected): {first}")
    fetch = f"`hf download {name}` (older huggingface_hub: `huggingface-cli download {name}`)"
    if _offline():
        return CheckpointError(
            f"hf_clip {what} {name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
            f"fetch it once with {fetch}, or run once with network access"
        )
    return CheckpointError(f"could not fetch hf_clip {what} {name!r} from the Hugging Face Hub ({first}); "
                           f"check the id, or fetch it with {fetch}")


def _hub_kwargs(cache_dir, revision) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"local_files_only": _offline(), "trust_remote_code": False}
    if cache_dir is not None:
        kwargs["cache_dir"] = str(cache_dir)
    if revision is not None:
        kwargs["revision"] = revision
    return kwargs


def _load_config(name: str, hub_kwargs):
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(os.path.expanduser(name), **hub_kwargs)
    except (OSError, ValueError, KeyError) as exc:  # hub errors are OSError/ValueError subclasses
        raise _load_error(name, exc) from None


def _processor_config(name: str, hub_kwargs) -> dict | None:
    """The checkpoint's ``preprocessor_config.json`` if there is one (optional:
    the defaults stand in for it, so any failure to find it means 'absent')."""
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        file = path / "preprocessor_config.json"
    else:
        try:
            from huggingface_hub import hf_hub_download

            file = Path(hf_hub_download(name, "preprocessor_config.json", local_files_only=hub_kwargs["local_files_only"],
                                        cache_dir=hub_kwargs.get("cache_dir"), revision=hub_kwargs.get("revision")))
        except Exception:  # noqa: BLE001  (missing file, offline, no such repo: all mean "use the defaults")
            return None
    try:
        return json.loads(file.read_text()) if file.is_file() else None
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"corrupt preprocessor_config.json for hf_clip model {name!r}: {exc}") from None


def _is_vision_only(config) -> bool:
    return getattr(config, "model_type", "") == "clip_vision_model"


@register_family("hf_clip")
def create_hf_clip(
    name: str,
    pretrained: str | bool | None = None,
    *,
    base: str | None = None,
    device: str | torch.device = "cpu",
    init_seed: int = 0,
    head_cache_dir: str | Path | None = "default",
    cache_dir: str | Path | None = None,
    revision: str | None = None,
) -> HFClipModel:
    """Load a ``transformers`` CLIP model (hub id or ``save_pretrained`` folder).

    ``name``'s weights are always loaded (a hub model is its weights);
    ``pretrained`` as a string, or ``base``, names the base CLIP model whose
    text tower and ``visual_projection`` complete a vision-only ``name``.
    ``init_seed`` seeds whatever the checkpoint does not cover (nothing for a
    complete CLIP model).
    """
    import cl_merge._torchvision_compat  # noqa: F401  (transformers imports torchvision)
    import transformers

    if isinstance(pretrained, str) and pretrained:
        if base is not None and base != pretrained:
            raise CheckpointError(f"hf_clip model {name!r}: base {base!r} and pretrained {pretrained!r} disagree; "
                                  "give the base model once")
        base = pretrained
    hub = _hub_kwargs(cache_dir, revision)
    config = _load_config(name, hub)
    vision_only = _is_vision_only(config)
    if not vision_only and getattr(config, "model_type", "") != "clip":
        raise CheckpointError(f"hf_clip model {name!r} is a {getattr(config, 'model_type', '?')!r} model, "
                              "not CLIP (expected model_type 'clip' or 'clip_vision_model')")
    if vision_only and base is None:
        raise CheckpointError(
            f"hf_clip checkpoint {name!r} is a vision tower only (CLIPVisionModel: no text tower, no "
            "visual_projection); name the CLIP model it was fine-tuned from, e.g. base='openai/clip-vit-base-patch32' "
            "(in a scenario: model.pretrained)"
        )
    full_name = base if vision_only else name
    if vision_only:
        base_config = _load_config(base, hub)
        if getattr(base_config, "model_type", "") != "clip":
            raise CheckpointError(f"hf_clip base model {base!r} must be a whole CLIP model (model_type 'clip'), "
                                  f"got {getattr(base_config, 'model_type', '?')!r}")
    try:
        with seeded_init(init_seed):
            clip = transformers.CLIPModel.from_pretrained(os.path.expanduser(full_name), **hub)
    except (OSError, ValueError) as exc:
        raise _load_error(full_name, exc) from None
    clip = clip.float().eval()
    if vision_only:
        try:
            vision = transformers.CLIPVisionModel.from_pretrained(os.path.expanduser(name), **hub)
        except (OSError, ValueError) as exc:
            raise _load_error(name, exc, "vision checkpoint") from None
        encoder = HFClipImageEncoder(clip.vision_model, clip.visual_projection)
        reference = encoder.state_dict()
        state = adapt_to_reference(vision.float().state_dict(), reference)
        from cl_merge.models.base import check_state_dict_fits

        check_state_dict_fits(reference, state, what=f"vision checkpoint {name!r} on base {base!r}")
        encoder.load_state_dict(state)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.expanduser(full_name), **hub)
    except (OSError, ValueError, TypeError) as exc:
        raise _load_error(full_name, exc, "tokenizer") from None
    image_size = int(clip.config.vision_config.image_size)
    processor = _processor_config(name, hub) or (_processor_config(base, hub) if vision_only else None)
    if head_cache_dir == "default":
        head_cache_dir = default_head_cache_dir()
    model = HFClipModel(
        clip,
        name=name,
        base=base if vision_only else None,
        tokenizer=_Tokenize(tokenizer, int(clip.config.text_config.max_position_embeddings)),
        preprocess=clip_image_transform(processor, image_size),
        head_cache_dir=head_cache_dir,
        init_seed=init_seed,
    )
    return model.to(device)


def encoder_state_from_pretrained(model: HFClipModel, name: str, *, cache_dir=None, revision=None) -> dict[str, torch.Tensor]:
    """The encoder weights of a hub id / ``save_pretrained`` folder (a whole
    ``CLIPModel`` or a vision-only ``CLIPVisionModel``) in ``model``'s encoder
    layout; a vision-only checkpoint gets ``model``'s ``visual_projection``."""
    import transformers

    hub = _hub_kwargs(cache_dir, revision)
    config = _load_config(name, hub)
    cls = transformers.CLIPVisionModel if _is_vision_only(config) else transformers.CLIPModel
    try:
        loaded = cls.from_pretrained(os.path.expanduser(name), **hub)
    except (OSError, ValueError) as exc:
        raise _load_error(name, exc) from None
    reference = model.encoder_state_dict()
    return adapt_to_reference({k: v.float() for k, v in loaded.state_dict().items()}, reference)
