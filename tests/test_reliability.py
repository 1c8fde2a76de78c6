"""Faults and bad input (issue 12): validation before anything is written,
run-folder takeover and locks, stale temp files, damaged checkpoints and
records, a full disk, file permissions, index shards outside the folder,
duplicate YAML keys, the CLI's help and the console."""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

import cl_merge  # noqa: F401  (torchvision compat first)
from cl_merge.cli import main
from cl_merge.config import load_yaml
from cl_merge.core.io import CheckpointReader, atomic_write_json, atomic_write_text, is_temp_file, save_state_dict
from cl_merge.errors import CheckpointError, ConfigError, DiskFullError
from cl_merge.runner import RunOptions, run_scenario
from cl_merge.runner.folder import LOCK_NAME, FolderLockedError, RunFolder, artifact_lock, remove_stale_temp_files
from cl_merge.scenario import load_scenario

TINY = {
    "setting": "task_incremental",
    "model": {"family": "clip", "name": "clmerge-tiny-clip", "pretrained": None},
    "stages": [{"dataset": "digits"}, {"dataset": "digits", "variant": "invert"}],
    "merge": [{"method": "ties", "hyperparameters": {"density": 0.5}}],
    "baselines": {"zero_shot": True, "individual": False},
    "train": {"lr": 1.0e-3, "max_steps": 2, "batch_size": 16, "warmup_steps": 0, "max_train": 64},
    "eval": {"batch_size": 64, "max_test": 20},
    "seed": 0,
}


pytestmark = pytest.mark.usefixtures("isolated_run_env")


def _scenario(tmp_path: Path, overrides=(), **changes):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, **changes}))
    return load_scenario(path, list(overrides))


def _options(out: Path, **kw) -> RunOptions:
    return RunOptions(out_dir=out, progress=False, wandb_mode="disabled", log=lambda m: None, **kw)


def _results(out: Path) -> dict:
    body = json.loads((out / "metrics.json").read_text())
    return {r["name"]: r["per_task"] for r in body["results"]}


# ---------------------------------------------------------------------- validation first (12.4, 12.5)
def test_invalid_configs_create_no_folder(tmp_path, monkeypatch):
    out = tmp_path / "run"
    bad = [
        {"model": {"family": "clip", "name": "ViT-Q-99", "pretrained": None}},
        {"stages": [{"dataset": "digits", "checkpoint": "missing.safetensors"}]},
        {"stages": [{"dataset": "digits"}, {"dataset": "digits", "variant": "invert",
                                             "checkpoint": "broken.safetensors"}]},
        {"merge": [{"method": "ties", "hyperparameters": {"density": 0.5, "scaling": 1.0}}],
         "train": {**TINY["train"], "accelerator": "gpu"}},
        {"stages": [{"dataset": "digits", "k_shot": 5000}, {"dataset": "digits", "variant": "invert"}]},
    ]
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{trunc")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for changes in bad:
        with pytest.raises(ConfigError, match=r"stages\[0\]\.k_shot: 5000 is larger than class" if "k_shot" in str(changes) else None):
            run_scenario(_scenario(tmp_path, **changes), _options(out))
        assert not out.exists(), changes
    with pytest.raises(ConfigError, match="seed: must be in"):
        _scenario(tmp_path, seed=-3)
    # the CLI: one line, rc 2, no folder
    path = tmp_path / "tiny.yaml"
    assert main(["run", str(path), "seed=-3", "--out", str(out)]) == 2
    assert not out.exists()


def test_folder_without_finished_artifacts_is_taken_over(tmp_path):
    out = tmp_path / "run"
    RunFolder(out, "aaaa", {"x": 1}).release()
    (out / "finetune" / "independent" / "00-digits" / "checkpoints").mkdir(parents=True)
    (out / "finetune" / "independent" / "00-digits" / "checkpoints" / "last.ckpt").write_bytes(b"partial")
    folder = RunFolder(out, "bbbb", {"x": 2})  # a corrected config: takes the folder over
    assert json.loads((out / "run.json").read_text())["fingerprint"] == "bbbb"
    assert yaml.safe_load((out / "config.yaml").read_text()) == {"x": 2}
    folder.release()
    (out / "eval" / "ties").mkdir(parents=True)
    (out / "eval" / "ties" / "stage-00.json").write_text("{}")
    with pytest.raises(ConfigError, match="different config .* holds results"):
        RunFolder(out, "cccc", {"x": 3})


# ---------------------------------------------------------------------- locks (12.9)
# another run holding a lock, as acquire_lock leaves it: an flock on a file naming the holder
# (plain fcntl, so the helper process starts in milliseconds instead of importing torch)
_HOLD = textwrap.dedent("""
    import fcntl, json, os, socket, sys, time
    os.makedirs(os.path.dirname(sys.argv[1]), exist_ok=True)
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}).encode())
    print("locked", flush=True)
    time.sleep(60)
""")


@pytest.fixture
def hold_lock():
    """A second process holding a lock file (as another run would)."""
    procs = []

    def start(path: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-S", "-c", _HOLD, str(path)], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_second_run_on_a_locked_folder_is_refused(tmp_path, hold_lock):
    out = tmp_path / "run"
    out.mkdir()
    holder = hold_lock(out / LOCK_NAME)
    with pytest.raises(FolderLockedError, match=rf"in use by pid {holder.pid} on host "):
        RunFolder(out, "aaaa", {})
    assert not (out / "run.json").exists()
    # a --stage job does not take the run lock; it locks its artifact
    RunFolder(out, "aaaa", {}, lock=False)
    stage_dir = out / "finetune" / "independent" / "00-digits"
    with artifact_lock(stage_dir):
        pass
    other = out / "finetune" / "independent" / "01-digits"
    job = hold_lock(other / LOCK_NAME)
    with pytest.raises(FolderLockedError, match=rf"pid {job.pid}"):
        with artifact_lock(other, "stage 1"):
            pass
    # the holder is gone (SIGKILL: its lock file stays behind): the lock is taken over
    holder.kill()
    holder.wait()
    RunFolder(out, "aaaa", {}).release()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-S", "-c", "pass"])
    dead.wait()
    (out / LOCK_NAME).write_text(json.dumps({"host": "here", "pid": dead.pid, "since": 0}))
    with caplog.at_level(logging.WARNING, logger="cl_merge.runner.folder"):
        folder = RunFolder(out, "aaaa", {})
    assert f"pid {dead.pid}" in caplog.text and "no longer running" in caplog.text
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    folder.release()
    assert not (out / LOCK_NAME).exists()


# ---------------------------------------------------------------------- stale temp files, damaged records (12.10)
def test_stale_temp_files_are_removed_on_start(tmp_path, hold_lock):
    out = tmp_path / "run"
    stage = out / "finetune" / "independent" / "00-digits"
    busy = out / "finetune" / "independent" / "01-digits"
    stage.mkdir(parents=True)
    busy.mkdir(parents=True)
    stale = stage / ".encoder.safetensors.k2j3h4x9.tmp.safetensors"
    stale.write_bytes(b"x" * 100)
    in_flight = busy / ".metadata.json.a1b2c3d4.tmp"
    in_flight.write_text("{")
    (stage / "encoder.safetensors").write_bytes(b"kept")
    hold_lock(busy / LOCK_NAME)  # a --stage job writing stage 1 right now
    RunFolder(out, "aaaa", {}).release()
    assert not stale.exists() and in_flight.exists() and (stage / "encoder.safetensors").exists()
    assert is_temp_file(stale.name) and not is_temp_file("encoder.safetensors") and not is_temp_file(LOCK_NAME)
    assert remove_stale_temp_files(tmp_path / "nowhere") == []


def test_corrupt_record_is_discarded_and_redone(tmp_path, caplog, capfd):
    scenario = _scenario(tmp_path)
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        run_scenario(scenario, _options(out))
    # no Lightning banner per fine-tune (GPU available / TPU / tips) in the log or on the console
    console = capfd.readouterr()
    for text in (caplog.text, console.out, console.err):
        assert "GPU available" not in text and "TPU available" not in text and "💡" not in text
    reference = _results(out)
    record = out / "eval" / "ties" / "stage-01.json"
    good = json.loads(record.read_text())
    record.write_text(record.read_text()[:15])  # truncated
    (out / "metrics.json").unlink()
    seen = []
    with caplog.at_level(logging.WARNING, logger="cl_merge.runner.folder"):
        run_scenario(scenario, _options(out, hook=lambda kind, name: seen.append((kind, name))))
    assert "is corrupt" in caplog.text and str(record) in caplog.text
    assert ("evaluate", "ties/01") in seen and ("finetune_step" not in {k for k, _ in seen})
    assert json.loads(record.read_text()) == good and _results(out) == reference


def _digits_task():
    return {"dataset": "digits", "max_train": 64, "max_val": 16, "max_test": 16}


class _StopAt:
    """Kills a fine-tune (an exception) once ``step`` optimizer steps are done."""

    def __new__(cls, step):
        import pytorch_lightning as pl

        class Stop(pl.Callback):
            def on_train_batch_end(self, trainer, *args):
                if trainer.global_step >= step:
                    raise RuntimeError("simulated kill")

        return Stop()


class _KillAtTrainEnd:
    def __new__(cls):
        import pytorch_lightning as pl

        class Kill(pl.Callback):
            def on_train_end(self, trainer, pl_module):
                raise RuntimeError("simulated kill")

        return Kill()


def test_truncated_last_ckpt_is_discarded_and_resume_step_recorded(tmp_path, caplog):
    from cl_merge.lit.config import TrainConfig
    from cl_merge.lit.finetune import finetune
    from cl_merge.models import ModelConfig

    model = ModelConfig(family="vit", name="clmerge-tiny-vit")
    cfg = TrainConfig(max_steps=4, batch_size=16, lr=1e-3, warmup_steps=0, progress_bar=False, cache_tensors=True,
                      accelerator="cpu", eval_splits=["test"], checkpoint_every_n_steps=2)
    out = tmp_path / "ft"
    with pytest.raises(RuntimeError, match="simulated kill"):
        finetune(model, _digits_task(), cfg, out_dir=out, seed=0, callbacks=[_StopAt(3)])
    (last,) = list(out.rglob("last.ckpt"))
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 2
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a kill or full disk mid-write
    with caplog.at_level(logging.WARNING, logger="cl_merge.lit.finetune"):
        result = finetune(model, _digits_task(), cfg, out_dir=out, seed=0)
    assert "does not load" in caplog.text and "training this stage from the start" in caplog.text
    assert result.metadata["resumed_from_step"] == 0 and result.metadata["global_step"] == 4
    # killed after the last step's checkpoint, before the artifacts: the rerun restores step 4 and trains
    # nothing more; the metadata names the step it resumed from (it said 0)
    out2 = tmp_path / "ft2"
    with pytest.raises(RuntimeError, match="simulated kill"):
        finetune(model, _digits_task(), cfg, out_dir=out2, seed=0, callbacks=[_KillAtTrainEnd()])
    (last,) = list(out2.rglob("last.ckpt"))
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 4
    result = finetune(model, _digits_task(), cfg, out_dir=out2, seed=0)
    assert result.metadata["resumed_from_step"] == 4 and result.metadata["global_step"] == 4


# ---------------------------------------------------------------------- full disk (12.6)
def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_is_one_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    import cl_merge.core.io as io_module

    tensors = {"w": torch.ones(4, 4)}
    monkeypatch.setattr(io_module, "save_file", _no_space)
    target = tmp_path / "out" / "merged.safetensors"
    with pytest.raises(DiskFullError, match=rf"^{target}: no space left on device$"):
        save_state_dict(tensors, target)
    monkeypatch.undo()
    monkeypatch.setattr(os, "fsync", _no_space)
    for write, target in ((lambda p: atomic_write_json(p, {"a": 1}), tmp_path / "out" / "rec.json"),
                          (lambda p: save_state_dict(tensors, p), tmp_path / "out" / "model.pt")):
        with pytest.raises(DiskFullError, match="no space left on device"):
            write(target)
        assert not target.exists()
    assert list((tmp_path / "out").iterdir()) == []  # no temp file left behind


def test_full_disk_in_the_cli_is_rc_2_and_one_line(tmp_path, monkeypatch, capsys):
    import safetensors.torch

    base, ft = tmp_path / "base.safetensors", tmp_path / "ft.safetensors"
    save_state_dict({"w": torch.zeros(3)}, base)
    save_state_dict({"w": torch.ones(3)}, ft)
    monkeypatch.setattr(safetensors.torch, "save_file", _no_space)  # the merge command's writer
    out = tmp_path / "merged.safetensors"
    rc = main(["merge", "--pretrained", str(base), "--finetuned", str(ft), "--out", str(out)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]  # beside the progress bar
    assert rc == 2 and "Traceback" not in err and len(errors) == 1
    assert errors[0] == f"cl-merge merge: error: {out}: no space left on device"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "ft.safetensors"]


# ---------------------------------------------------------------------- permissions (12.8)
def test_written_files_get_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        save_state_dict({"w": torch.zeros(2)}, tmp_path / "b.safetensors")
        save_state_dict({"w": torch.zeros(2)}, tmp_path / "c.pt")
        os.umask(0o027)
        atomic_write_json(tmp_path / "d.json", {})
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"a.txt": 0o644, "b.safetensors": 0o644, "c.pt": 0o644, "d.json": 0o640}


# ---------------------------------------------------------------------- minor (12.12)
def test_index_shards_outside_the_folder_are_refused(tmp_path):
    outside = tmp_path / "secret.safetensors"
    save_state_dict({"w": torch.zeros(2)}, outside)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for shard in ("../secret.safetensors", str(outside)):
        (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
        with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
            CheckpointReader(ckpt)
    save_state_dict({"w": torch.ones(2)}, ckpt / "model-00001.safetensors")
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-00001.safetensors"}}))
    assert CheckpointReader(ckpt).get("w").tolist() == [1.0, 1.0]


def test_duplicate_yaml_keys_are_refused(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("seed: 1\ntrain: {lr: 0.1, max_steps: 3, lr: 0.2}\n")
    with pytest.raises(ConfigError, match=r"dup.yaml line 2: duplicate key 'lr' \(first given on line 2\)"):
        load_yaml(path)
    path.write_text("base: &b {lr: 0.1}\ntrain:\n  <<: *b\n  lr: 0.2\n")  # a merge key may be overridden
    assert load_yaml(path)["train"] == {"lr": 0.2}


def test_help_first_line_is_a_whole_sentence(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    description = text.split("\n\n")[1].strip()
    assert description.endswith(".") and description.startswith("cl-merge:")
    assert "--dry-run" in _run_help(capsys)


def _run_help(capsys) -> str:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    return capsys.readouterr().out
