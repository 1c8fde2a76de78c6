"""``cl-merge convert IN OUT.safetensors [--to open_clip|hf_clip]``

Rewrites a checkpoint as safetensors, running no code from it:
- IN: a safetensors file or folder (sharded, or a ``save_pretrained``
  folder), a weights-only torch file, or a pickled module / Lightning
  ``.ckpt`` (read by the restricted unpickler of
  :mod:`cl_merge.core.pickle_import`; the classes it names need not be
  installed);
- ``--to``: also rename the keys into open_clip's or Hugging Face's CLIP
  layout (:mod:`cl_merge.models.clip_layouts`); without it the tensors keep
  the names ``module.state_dict()`` gives them.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN", help="checkpoint file or folder (safetensors, .pt/.pth/.bin/.ckpt)")
    parser.add_argument("output", metavar="OUT", help="output .safetensors file")
    parser.add_argument("--to", choices=("open_clip", "hf_clip"), default=None,
                        help="rename the keys into this CLIP layout (default: keep the names)")


def main(args: argparse.Namespace) -> int:
    from cl_merge.core.io import save_state_dict
    from cl_merge.core.pickle_import import load_checkpoint_tensors
    from cl_merge.errors import ConfigError
    from cl_merge.models.clip_layouts import convert_layout, detect_layout

    out = Path(args.output)
    if out.suffix != ".safetensors":
        raise ConfigError(f"OUT must be a .safetensors file, got {args.output}")
    if Path(args.input).resolve() == out.resolve():
        raise ConfigError(f"OUT is the input file {args.input}; write to another file")
    state = load_checkpoint_tensors(args.input)
    source_layout = detect_layout(state)
    if args.to is not None:
        state = convert_layout(state, args.to)
    layout = detect_layout(state)
    save_state_dict(state, out, {"cl_merge_kind": "converted", "source": Path(args.input).name, "layout": layout})
    change = f"{source_layout} -> {layout}" if args.to is not None else layout
    print(f"wrote {len(state)} tensors ({change}) to {out}")
    return 0
