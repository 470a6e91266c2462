"""Reloading a saved adapter, and ``aligntk merge``: adapter + base -> one Hugging Face model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import torch

from aligntk import AligntkError

from .adapters import BASE_FOLDER


def base_source(adapter_dir: Path, base: str | None = None) -> str:
    """Where the base model of a saved adapter is: ``base``, else ``adapter_dir/base``, else its config's."""
    if base is not None:
        return base
    if (adapter_dir / BASE_FOLDER).is_dir():
        return str(adapter_dir / BASE_FOLDER)
    config = _adapter_config(adapter_dir)
    named = config.get("base_model_name_or_path")
    if not named:
        raise AligntkError(f"{adapter_dir}: the adapter names no base model; pass --base MODEL_DIR")
    return str(named)


def _adapter_config(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise AligntkError(f"{adapter_dir}: no adapter_config.json here; is this the model folder of a peft run?")
    return json.loads(path.read_text())


def load_adapter(adapter_dir: str | Path, base: str | None = None) -> torch.nn.Module:
    """The base model with the saved adapter applied (a ``peft.PeftModel``), in eval mode."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    adapter_dir = Path(adapter_dir)
    auto = (
        AutoModelForSequenceClassification
        if _adapter_config(adapter_dir).get("task_type") == "SEQ_CLS"
        else AutoModelForCausalLM
    )
    model = auto.from_pretrained(base_source(adapter_dir, base))
    return PeftModel.from_pretrained(model, adapter_dir).eval()


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, base: str | None = None) -> Path:
    """Fold a LoRA adapter into its base and save a plain Hugging Face model and tokenizer."""
    from transformers import AutoTokenizer

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    kind = _adapter_config(adapter_dir).get("peft_type")
    if kind != "LORA":
        raise AligntkError(
            f"{adapter_dir}: a {kind} adapter cannot be folded into the weights (only LoRA can); "
            "load it with peft's PeftModel.from_pretrained instead"
        )
    merged = load_adapter(adapter_dir, base).merge_and_unload()
    merged.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(out_dir)
    return out_dir


@click.command("merge")
@click.argument("adapter_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--base", default=None, help="base model folder; default: ADAPTER_DIR/base, else the adapter's config")
def merge_command(adapter_dir: Path, out_dir: Path, base: str | None) -> None:
    """Merge a LoRA adapter (RUN_DIR/model) into its base model and save a full model in OUT_DIR."""
    try:
        merge_adapter(adapter_dir, out_dir, base)
    except AligntkError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"merged {adapter_dir} into {out_dir}")
