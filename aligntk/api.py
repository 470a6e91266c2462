"""``aligntk.train``: run a recipe from Python, with in-memory models, datasets and reward functions.

What the CLI reads from files can be handed over as objects here, as a TRL user would:
a ``transformers`` model and tokenizer, ``datasets.Dataset`` (or lists of dicts) for
training and evaluation, and reward functions ``fn(prompts, completions, **fields) ->
list[float]``. The recipe still names only registered components; Python code reaches a
run only through these arguments, never through the recipe.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .datafiles import in_memory_rows
from .engine import RunResult
from .engine import train as run_resolved
from .errors import RecipeError
from .plugins import Plugins, load_plugins
from .recipe import ResolvedRecipe, read_recipe, validate_recipe

__all__ = ["run_resolved", "train"]

#: The ``model.path`` recorded in the run folder's recipe when the model is handed over in memory.
IN_MEMORY_MODEL = "(in-memory model)"


def train(
    recipe: dict[str, Any] | str | Path | ResolvedRecipe,
    *,
    model: Any = None,
    tokenizer: Any = None,
    train_dataset: Iterable[dict[str, Any]] | None = None,
    eval_dataset: Iterable[dict[str, Any]] | None = None,
    rewards: Sequence[Callable[..., Sequence[float]]] = (),
    plugins: Plugins | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> RunResult:
    """Validate ``recipe`` and run it to the end, with any in-memory parts given.

    Example::

        result = aligntk.train(
            {"output_dir": "runs/py", "data": {"name": "sft"}, "loss": {"name": "sft"},
             "train": {"max_steps": 2, "batch_size": 2}},
            model=model, tokenizer=tokenizer, train_dataset=Dataset.from_list(rows),
        )

    Args:
        recipe: a recipe dict, the path of a YAML recipe, or a ``ResolvedRecipe``
            (``validate_recipe``'s result).
        model: a ``transformers`` model used as the policy instead of loading
            ``model:``. The ``model`` section may then be omitted; if it is given (or
            partial) it is not loaded, only recorded in the run folder's recipe.
            Frozen roles (``models:``) still load from the recipe; a role that defaults
            to the policy (the reference) is a frozen copy of this model.
        tokenizer: the tokenizer used instead of loading ``model:``'s; needed with
            ``model`` unless the ``model`` section names a ``path`` or ``tokenizer``
            folder to load it from.
        train_dataset: training rows (a ``datasets.Dataset``, a list of dicts ...),
            replacing ``data.path``. The recipe's data component (any with ``path``,
            ``FileDataConfig``) reads them exactly as a file's rows, through
            ``read_rows``: nothing is written to disk, and a bad row is reported as
            ``train_dataset: row 5: ...`` (1-based). Rows are kept in memory rather than
            written to a JSONL so their values keep their types (no JSON round trip)
            and messages name the argument, not a temporary file.
        eval_dataset: evaluation rows, replacing ``data.eval_path``
            (``eval_dataset: row 5`` in messages).
        rewards: reward functions ``fn(prompts, completions, **fields) -> list[float]``
            (TRL's GRPO convention; ``fields`` holds ``references``), scored after the
            recipe's ``rewards`` with weight 1 each, for online data (``rollout``). Each
            one's mean is logged as ``reward/<fn.__name__>``.
        plugins: the loaded plugins (default: every installed one).
        resume: continue from the run folder's last checkpoint.
        overwrite: replace an existing run folder.

    Returns:
        The engine's ``RunResult`` (its ``run_dir`` holds ``metrics.jsonl`` and ``model/``).

    Raises:
        RecipeError: the recipe is invalid, or an argument does not fit it (a dataset for
            a data component without ``path``, a reward that is not callable).
        DataError: a row is bad (named ``train_dataset: row N`` or ``eval_dataset: row N``).
    """
    plugins = plugins if plugins is not None else load_plugins()
    for i, fn in enumerate(rewards):
        if not callable(fn):
            raise RecipeError(f"rewards[{i}]: expected a function fn(prompts, completions, **fields), got {fn!r}")
    with contextlib.ExitStack() as stack:
        paths = {
            key: stack.enter_context(in_memory_rows(name, _rows(rows)))
            for key, name, rows in (("path", "train_dataset", train_dataset), ("eval_path", "eval_dataset", eval_dataset))
            if rows is not None
        }
        resolved = _resolve(recipe, plugins, paths, has_model=model is not None)
        spec = resolved.recipe.model
        if model is not None and tokenizer is None and spec.path == IN_MEMORY_MODEL and spec.tokenizer is None:
            raise RecipeError("tokenizer: an in-memory model needs tokenizer= (or a model.tokenizer folder)")
        return run_resolved(
            resolved,
            plugins,
            resume=resume,
            overwrite=overwrite,
            model=model,
            tokenizer=tokenizer,
            reward_fns=[(_name_of(fn), fn) for fn in rewards],
        )


def _rows(rows: Iterable[dict[str, Any]]) -> list[Any]:
    """A dataset's rows as a list (a ``datasets.Dataset`` iterates as dicts)."""
    return list(rows)


def _name_of(fn: Callable[..., Any]) -> str:
    return str(getattr(fn, "__name__", None) or type(fn).__name__)


def _resolve(
    recipe: dict[str, Any] | str | Path | ResolvedRecipe, plugins: Plugins, paths: dict[str, Path], has_model: bool
) -> ResolvedRecipe:
    """The validated recipe, with the in-memory datasets' stand-in paths in its data section."""
    if isinstance(recipe, ResolvedRecipe):
        if not paths:
            return recipe
        config = recipe.data.config
        missing = [key for key in paths if key not in type(config).model_fields]
        if missing:
            raise RecipeError(f"data: {recipe.data.name!r} reads no files ({missing[0]!r}): it cannot take a dataset")
        config = config.model_copy(update=paths)
        return dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, config=config))
    source: Path | None = None
    if isinstance(recipe, (str, Path)):
        source = Path(recipe)
        raw = read_recipe(source)
    else:
        raw = copy.deepcopy(recipe)
    data = raw.get("data")
    if paths and isinstance(data, dict):
        raw["data"] = {**data, **{key: str(path) for key, path in paths.items()}}
    if has_model:
        section = raw.get("model") if isinstance(raw.get("model"), dict) else {}
        if section.get("path") is None and section.get("config") is None:
            raw["model"] = {**section, "path": IN_MEMORY_MODEL}
    return validate_recipe(raw, plugins.registry, source=source)
