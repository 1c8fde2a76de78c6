"""The run folder: every finished step leaves an artifact here, written
atomically, and a rerun skips the steps whose artifact exists. That is
resume, and it is also how fine-tunes run as separate cluster jobs (each job
writes its stage's artifacts; ``cl-merge run`` picks them up).

A run folder belongs to one resolved config: ``run.json`` records its
fingerprint and a rerun with a different config is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from cl_merge.core.io import atomic_write_json, atomic_write_text
from cl_merge.errors import ConfigError


class RunFolder:
    def __init__(self, root: str | Path, fingerprint: str, resolved_config: dict[str, Any]):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"run folder {self.root} exists and is not a folder")
        manifest = self.root / "run.json"
        if manifest.exists():
            try:
                recorded = json.loads(manifest.read_text()).get("fingerprint")
            except (json.JSONDecodeError, AttributeError):
                raise ConfigError(f"{manifest} is corrupt; remove the run folder or choose another --out") from None
            if recorded != fingerprint:
                raise ConfigError(
                    f"run folder {self.root} was written by a different config (fingerprint {recorded}, "
                    f"this config {fingerprint}); refusing to resume it: choose another --out or delete the folder"
                )
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.root / "config.yaml", yaml.safe_dump(resolved_config, sort_keys=False))
            atomic_write_json(manifest, {"fingerprint": fingerprint})
        self.fingerprint = fingerprint

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def has(self, *parts: str) -> bool:
        return self.path(*parts).exists()

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.path(*parts).read_text())

    def write_json(self, obj: Any, *parts: str) -> Path:
        target = self.path(*parts)
        atomic_write_json(target, obj)
        return target
