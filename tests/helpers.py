"""Helpers several test files share: ``from helpers import ...`` (pytest puts tests/ on sys.path).

Test files import from here, never from each other, so no test module is imported (and its
tests collected twice, or its fixtures shadowed) because another one needs a helper.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from aligntk import ComponentConfig, hookimpl

# --------------------------------------------------------------------------------------
# Saved weights
# --------------------------------------------------------------------------------------


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The final model weights of a run folder (``model/model.safetensors``)."""
    return load_file(str(Path(run_dir) / "model" / "model.safetensors"))


def assert_same_weights(a: Path, b: Path, atol: float = 0.0) -> None:
    """Two run folders end with the same weights: bit for bit, or within ``atol``."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        if atol == 0.0:
            assert torch.equal(wa[name], wb[name]), name
        else:
            torch.testing.assert_close(wa[name], wb[name], atol=atol, rtol=1e-5, msg=name)


# --------------------------------------------------------------------------------------
# Online RL
# --------------------------------------------------------------------------------------


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Independent reference: every token's log-prob from full logits, ``[B, T]``, position 0 is 0."""
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logps.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return torch.nn.functional.pad(picked, (1, 0))


class OnesConfig(ComponentConfig):
    pass


class Ones:
    """A reward that is easy to move: the share of '1' characters in the completion."""

    Config = OnesConfig

    def __init__(self, config: OnesConfig):
        pass

    def __call__(self, prompts: Any, completions: Any, **fields: Any) -> torch.Tensor:
        return torch.tensor([c.count("1") / max(len(c), 1) for c in completions])


class OnesPlugin:
    """Registers the ``ones`` reward: ``run_recipe(..., plugins={"ones": OnesPlugin()})``."""

    @hookimpl
    def aligntk_register_rewards(self, register: Any) -> None:
        register("ones", Ones)


def char_ids(tok: Any, text: str) -> list[int]:
    """One id per character: what ``aligntk.testing.char_tokenizer`` produces for ``text``."""
    vocab = tok.get_vocab()
    return [vocab[ch] for ch in text]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """``rows`` as JSON Lines at ``path``; returns ``path``."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------
# Launching several processes
# --------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port nobody listens on now, for a torchrun rendezvous.

    Fixed ports collided in CI (``EADDRINUSE`` on a port no test of the run held: the
    network is shared with whatever else runs on the machine); the OS's pick does not.
    """
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
