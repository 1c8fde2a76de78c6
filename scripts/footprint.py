"""Disk footprint of a scenario's run folder, from the sizes of its artifacts.

    PYTHONPATH=. python scripts/footprint.py offline_default [--measure RUN_FOLDER]

Builds θ0 of the scenario's model (weights not needed: sizes only), measures
one saved artifact of each kind (encoder, task vector, head, each method's
strategy state after one task) and counts how many of each the run writes:

- ``old``: every fine-tune keeps encoder *and* task vector; every method keeps
  a merged model and a state per stage; independent fine-tunes per order;
- ``new``: a fine-tune keeps its encoder only (the task vector is derived);
  each method keeps its latest merged model, and its latest state while the
  run is not finished (``keep`` defaults);
  independent fine-tunes shared by the orders.

``--measure`` adds the real size of a finished run folder.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def _size(state) -> int:
    from cl_merge.core.io import save_state_dict

    with tempfile.TemporaryDirectory() as tmp:
        path = save_state_dict(state, Path(tmp) / "x.safetensors")
        return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario")
    parser.add_argument("--measure", type=Path, action="append", default=[])
    args = parser.parse_args()

    import torch

    import cl_merge  # noqa: F401
    from cl_merge.merging import TaskInput, build_strategy, get_method
    from cl_merge.models import create_model
    from cl_merge.runner.artifacts import folder_size
    from cl_merge.runner.loop import IndividualRow, MethodRow, SequentialFinetuneRow, scenario_rows
    from cl_merge.scenario import load_scenario

    sc = load_scenario(args.scenario)
    model = create_model(sc.model.family, sc.model.name, None, init_seed=sc.seed)
    theta0 = model.encoder_state_dict()
    tv = {k: torch.randn_like(v) * 1e-3 for k, v in theta0.items() if v.is_floating_point()}
    encoder = _size(theta0)
    task_vector = _size(tv)
    head = _size(model.make_head(["a"] * 10, ["{}"]).state_dict()) if not model.head_trainable else encoder // 50
    states = {}
    for spec in sc.methods:
        strategy = build_strategy(get_method(spec.method, **spec.hyperparameters))
        strategy.start(theta0)
        strategy.absorb(TaskInput(0, tv))
        state = strategy.state_dict()
        states[spec.name or spec.method] = _size(state) if state is not None else 0
    T, orders = len(sc.stages), len(sc.expand_orders())
    rows = scenario_rows(sc)
    # fine-tune chains: independent (methods from θ0, the individual baseline), order-dependent ones
    class _Probe:  # what MethodRow.chain reads
        scenario, setting = sc, sc.setting
    chains = set()
    for row in rows:
        if isinstance(row, MethodRow):
            chains.add(row.chain(_Probe))
        elif isinstance(row, IndividualRow):
            chains.add("independent")
        elif isinstance(row, SequentialFinetuneRow):
            chains.add("sequential")
    per_order_chains = len([c for c in chains if c != "independent"])
    merge_stages = T if sc.setting != "multi_task" else 1
    old_ft = (len(chains) * T * orders) * (encoder + task_vector + head)
    new_ft = (T * ("independent" in chains) + per_order_chains * T * orders) * (encoder + head)
    old_merge = orders * merge_stages * sum(encoder + s for s in states.values())
    new_merge = orders * len(states) * encoder  # a finished run keeps the last merged model, no state
    new_peak = new_merge + orders * sum(states.values())  # while running: + the latest state per method
    gb = 1 / 2**20
    print(f"scenario {sc.name}: {T} stages, {orders} order(s), chains {sorted(chains)}, methods {list(states)}")
    print(f"  encoder {encoder * gb:.2f} MiB, task vector {task_vector * gb:.2f} MiB, head {head * gb:.3f} MiB, "
          "states " + ", ".join(f"{k} {v * gb:.2f} MiB" for k, v in states.items()))
    print(f"  old layout: fine-tunes {old_ft * gb:.1f} MiB + merges {old_merge * gb:.1f} MiB = "
          f"{(old_ft + old_merge) * gb:.1f} MiB")
    print(f"  new layout: fine-tunes {new_ft * gb:.1f} MiB + merges {new_merge * gb:.1f} MiB = "
          f"{(new_ft + new_merge) * gb:.1f} MiB (at most {(new_ft + new_peak) * gb:.1f} MiB while running)")
    for folder in args.measure:
        print(f"  measured {folder}: {folder_size(folder) * gb:.1f} MiB")


if __name__ == "__main__":
    main()
