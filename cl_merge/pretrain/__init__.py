"""Pretrained weights the toolkit makes itself, offline (see ``offline_clip``)."""

from cl_merge.pretrain.offline_clip import OFFLINE_TAG, OfflinePretrainConfig, ensure_offline_clip

__all__ = ["OFFLINE_TAG", "OfflinePretrainConfig", "ensure_offline_clip"]
