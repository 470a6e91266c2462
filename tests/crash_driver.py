"""Run a recipe and SIGKILL this process at one chosen moment, as a crashed machine would.

Usage: ``python tests/crash_driver.py RECIPE.json MOMENT N`` kills the process at the
``N``-th time MOMENT is reached (1-based); ``slow`` instead sleeps after every step so
that a test can send a real signal from outside. Numerics are untouched: every patch
runs the original code and only adds the kill (or the pause).

Moments:
    step        inside an optimizer step: gradients computed, update not yet applied
    weights     inside a checkpoint write: model.safetensors written, state.pt not yet
    torn        inside a checkpoint write: model.safetensors half written
    manifest    inside a checkpoint write: every file and the manifest written, not yet renamed
    rotated     just after a checkpoint is complete, before the next step
    metrics     inside a metrics.jsonl write: half a record written
    final       inside the final model write: .tmp-model written, not yet renamed
    eval        inside an evaluation
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

torch.set_num_threads(min(2, torch.get_num_threads()))  # as the tests' own process (conftest)


def main() -> None:
    recipe_path, moment, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
    recipe = json.loads(Path(recipe_path).read_text())

    from aligntk import checkpoint as ckpt
    from aligntk import engine
    from aligntk.testing import run_recipe

    calls = {"n": 0}

    def kill_on_nth() -> None:
        calls["n"] += 1
        if calls["n"] == nth:
            os.kill(os.getpid(), signal.SIGKILL)

    def after(owner: Any, name: str, action: Any = kill_on_nth) -> None:
        original = getattr(owner, name)

        def patched(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            action()
            return out

        setattr(owner, name, patched)

    def before(owner: Any, name: str) -> None:
        original = getattr(owner, name)

        def patched(*args: Any, **kwargs: Any) -> Any:
            kill_on_nth()
            return original(*args, **kwargs)

        setattr(owner, name, patched)

    if moment == "step":
        before(engine._Trainer, "_optimizer_step")
    elif moment == "weights":
        after(ckpt, "save_model")
    elif moment == "torn":
        original = ckpt.save_model

        def half_written(model: Any, path: str) -> None:
            original(model, path)
            calls["n"] += 1
            if calls["n"] == nth:
                size = os.path.getsize(path)
                os.truncate(path, size // 2)
                os.kill(os.getpid(), signal.SIGKILL)

        ckpt.save_model = half_written
    elif moment == "manifest":
        after(ckpt, "write_manifest")
    elif moment == "rotated":
        after(engine._Trainer, "save_checkpoint")
    elif moment == "metrics":
        original_write = engine._Trainer._write

        def torn_write(self: Any, record: dict[str, Any]) -> None:
            calls["n"] += 1
            if calls["n"] == nth:
                with self.metrics_file.open("a", encoding="utf-8") as f:
                    line = json.dumps(record)
                    f.write(line[: len(line) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            original_write(self, record)

        engine._Trainer._write = torn_write
    elif moment == "final":
        after(engine, "save_pretrained")
    elif moment == "eval":
        before(engine._Trainer, "_eval_loss")
    elif moment == "slow":  # through the command line, to see its exit status and message
        from aligntk.cli import main as cli

        after(engine._Trainer, "train_step", lambda: time.sleep(0.3))
        cli(["run", recipe_path], standalone_mode=True)
    else:
        raise SystemExit(f"unknown moment {moment!r}")
    run_recipe(recipe)


if __name__ == "__main__":
    main()
