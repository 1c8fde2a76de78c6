"""A tiny CLIP pretrained offline, once, so the default benchmark has a real θ0.

Hub weights cannot be downloaded on an offline machine, and a randomly
initialised CLIP has no zero-shot ability, which would make every merging
result meaningless. So the toolkit pretrains ``clmerge-tiny-clip``
contrastively on a mixture of the offline datasets (Fashion-MNIST,
Animal-MNIST, scikit-learn digits; original images only, never the rotated or
inverted variants the benchmark's later stages use), with captions built from
the class names and each dataset's prompt templates. The text tower learns
the class names, so zero-shot heads work; the image tower is weak on the
variants, which leaves room for fine-tuning and merging to matter.

Loss: CLIP's symmetric cross-entropy between a batch of images and one
caption per class of the mixture (a random template each step): images pick
their class's caption among all captions; each caption picks, among the
batch's images, those of its class (multi-positive targets, since a batch
holds many images of one class and one-hot targets would push them apart).

The result is cached under ``$CL_MERGE_CACHE_DIR`` (default
``~/.cache/cl_merge``) as ``offline/<name>-<hash>.safetensors``, keyed by the
pretraining config; an interrupted pretraining restarts (it takes minutes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cl_merge.core.io import save_state_dict

OFFLINE_TAG = "clmerge-offline"


@dataclasses.dataclass(frozen=True)
class OfflinePretrainConfig:
    model: str = "clmerge-tiny-clip"
    datasets: tuple[str, ...] = ("fashion_mnist", "animal_mnist", "digits")
    max_per_dataset: int = 12000
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    seed: int = 0

    def fingerprint(self) -> str:
        # the captions are part of what the text tower learns: weights cached
        # under other class names or templates are not these weights
        from cl_merge.data.registry import get_dataset_info

        body = dataclasses.asdict(self)
        body["captions"] = {name: [list(get_dataset_info(name).classnames), list(get_dataset_info(name).templates)]
                            for name in self.datasets}
        text = json.dumps(body, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_root() -> Path:
    return Path(os.environ.get("CL_MERGE_CACHE_DIR", Path.home() / ".cache" / "cl_merge"))


def offline_weights_path(config: OfflinePretrainConfig = OfflinePretrainConfig()) -> Path:
    return cache_root() / "offline" / f"{config.model}-{config.fingerprint()}.safetensors"


def _mixture(config: OfflinePretrainConfig, preprocess, data_root=None):
    """Images (preprocessed tensors), global class ids, and per-class captions."""
    from cl_merge.data import TaskSpec, cache_tensors, load_task

    images, labels, captions = [], [], []
    for name in config.datasets:
        task = load_task(TaskSpec(name, max_train=config.max_per_dataset), data_root, seed=config.seed)
        cached = cache_tensors(task.train, preprocess)
        offset = len(captions)
        images.append(cached.inputs)
        labels.append(torch.as_tensor(cached.labels) + offset)
        captions.extend([[t.format(c) for t in task.templates] for c in task.classnames])
    return torch.cat(images), torch.cat(labels), captions


def pretrain_offline_clip(config: OfflinePretrainConfig = OfflinePretrainConfig(), *, data_root=None,
                          progress: bool = True) -> dict[str, torch.Tensor]:
    """Contrastive pretraining; returns the full open_clip state dict."""
    from cl_merge.models.clip import create_clip

    model = create_clip(config.model, None, init_seed=config.seed, head_cache_dir=None)
    clip = model.clip.train()
    images, labels, captions = _mixture(config, model.preprocess(train=False), data_root)
    # every (class, template) caption tokenised once
    flat = [(cls, text) for cls, texts in enumerate(captions) for text in texts]
    tokens = model.tokenizer([text for _, text in flat])
    caption_class = torch.tensor([cls for cls, _ in flat])
    by_class = [torch.nonzero(caption_class == c).flatten() for c in range(len(captions))]

    gen = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW([p for p in clip.parameters() if p.requires_grad],
                                  lr=config.lr, weight_decay=config.weight_decay)

    def lr_at(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress_frac = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * (1 + torch.cos(torch.tensor(progress_frac * torch.pi)).item())

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    steps = range(config.steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="offline CLIP pretraining (once)", unit="step")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        for _ in steps:
            idx = torch.randint(len(labels), (config.batch_size,), generator=gen)
            batch_cls = labels[idx]
            caption_idx = torch.stack([
                options[torch.randint(len(options), (1,), generator=gen)[0]] for options in by_class
            ])
            image_f = F.normalize(clip.encode_image(images[idx]), dim=-1)
            text_f = F.normalize(clip.encode_text(tokens[caption_idx]), dim=-1)  # [C, d], caption c of class c
            logits = clip.logit_scale.exp().clamp(max=100) * image_f @ text_f.T  # [B, C]
            present = torch.unique(batch_cls)
            member = (batch_cls[None, :] == present[:, None]).float()  # [classes in batch, B]
            text_loss = F.cross_entropy(logits.T[present], member / member.sum(dim=1, keepdim=True))
            loss = 0.5 * (F.cross_entropy(logits, batch_cls) + text_loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            if progress:
                steps.set_postfix(loss=f"{loss.item():.3f}")
    return {k: v.detach().clone() for k, v in clip.state_dict().items()}


def ensure_offline_clip(config: OfflinePretrainConfig = OfflinePretrainConfig(), *, data_root=None,
                        progress: bool = True, log=print) -> Path:
    """Path of the cached offline weights, pretraining them first if needed."""
    path = offline_weights_path(config)
    if path.exists():
        return path
    log(f"pretraining {config.model} offline ({config.steps} steps; cached at {path} for later runs)")
    start = time.perf_counter()
    state = pretrain_offline_clip(config, data_root=data_root, progress=progress)
    save_state_dict(state, path, {"cl_merge_kind": "offline_clip", "config": json.dumps(dataclasses.asdict(config))})
    log(f"offline pretraining took {time.perf_counter() - start:.0f} s")
    return path
