"""Recipes: YAML in, a validated recipe out, before any model loads.

A recipe refers to components by registered name; each component validates its own
options with its ``Config`` model. Errors name the key path and, for unknown keys,
the close match (``train.lerning_rate: unknown key, did you mean 'learning_rate'?``).
Recipes are read with ``yaml.safe_load`` and never name import paths or run code.
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import RecipeError
from .registry import Registry
from .types import ComponentConfig


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    value = value.expanduser()
    if not value.is_absolute() and base is not None:
        value = Path(base) / value
    return value


def _must_exist(value: Path) -> Path:
    if not value.exists():
        raise ValueError(f"file not found: {value}")
    return value


#: A path in a recipe, resolved relative to the recipe file's folder. Use it in component configs.
LocalPath = Annotated[Path, AfterValidator(_resolve_path)]
#: A ``LocalPath`` that must exist when the recipe is validated (input files).
LocalFile = Annotated[Path, AfterValidator(_resolve_path), AfterValidator(_must_exist)]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ComponentSpec(BaseModel):
    """``name`` picks a registered component; every other key is that component's option."""

    model_config = ConfigDict(extra="allow")
    name: str


class WeightedComponentSpec(ComponentSpec):
    """A loss term: a component and its weight in the total loss."""

    weight: float = 1.0


class ModelSpec(StrictModel):
    """A model: from a local Hugging Face folder (or hub id) or built from a config (random init)."""

    path: str | None = None
    config: dict[str, Any] | None = Field(default=None, description="transformers config keys, with model_type")
    task: Literal["causal_lm", "sequence_classification"] = "causal_lm"
    num_labels: PositiveInt | None = Field(default=None, description="classification head size (sequence_classification)")
    tokenizer: str | None = Field(default=None, description="tokenizer folder; default: the model's path")
    pad_token: str | None = Field(default=None, description="token to pad with when the tokenizer has none")
    trust_remote_code: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: str | None = "sdpa"

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.path is None) == (self.config is None):
            raise ValueError("give exactly one of 'path' (a model folder) or 'config' (build from a config)")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("'config' needs a 'model_type' (for example llama or gpt2)")
        if self.config is not None and self.tokenizer is None:
            raise ValueError("a model built from 'config' needs a 'tokenizer' folder")
        return self


class TrainSpec(StrictModel):
    """The engine's options: the same for every method."""

    max_steps: PositiveInt
    batch_size: PositiveInt = Field(8, description="sequences per micro-batch per process")
    grad_accum: PositiveInt = Field(1, description="micro-batches per optimizer step")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    gradient_checkpointing: bool = False
    compile: bool = Field(False, description="run the policy's training forward through torch.compile")
    eval_every: PositiveInt | None = None
    eval_batch_size: PositiveInt | None = None
    save_every: PositiveInt | None = None
    keep_checkpoints: PositiveInt = 2
    log_every: PositiveInt = 1


class Recipe(StrictModel):
    """A whole run. Component sections keep their options until ``validate_recipe`` checks them."""

    output_dir: str = "runs/run"
    seed: int = 0
    model: ModelSpec
    models: dict[str, ModelSpec] = Field(default_factory=dict, description="frozen models by role")
    data: ComponentSpec
    loss: list[WeightedComponentSpec]
    update: ComponentSpec = ComponentSpec(name="full")
    evaluators: list[ComponentSpec] = Field(default_factory=list)
    rewards: list[WeightedComponentSpec] = Field(default_factory=list, description="reward components for rollouts")
    train: TrainSpec
    plugins: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="options of lifecycle plugins, by plugin name; each plugin validates its own at run start",
    )

    @field_validator("loss", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else value

    @field_validator("models")
    @classmethod
    def _no_policy(cls, value: dict[str, ModelSpec]) -> dict[str, ModelSpec]:
        if "policy" in value:
            raise ValueError("the policy is 'model'; 'models' holds frozen roles such as reference or teacher")
        return value


@dataclass
class Component:
    """A validated component section: the registered class and its checked options."""

    name: str
    cls: type
    config: ComponentConfig
    weight: float = 1.0

    def build(self) -> Any:
        return self.cls(self.config)

    def dump(self) -> dict[str, Any]:
        return {"name": self.name, **self.config.model_dump(mode="json")}


@dataclass
class ResolvedRecipe:
    """A recipe with every component looked up and its options validated."""

    recipe: Recipe
    data: Component
    losses: list[Component]
    update: Component
    evaluators: list[Component]
    rewards: list[Component] = field(default_factory=list)
    source: Path | None = None

    @property
    def train(self) -> TrainSpec:
        return self.recipe.train

    def roles(self) -> tuple[str, ...]:
        """Every model role the losses declare, policy first."""
        roles = ["policy"]
        for loss in self.losses:
            roles += [r for r in loss.cls.roles if r not in roles]
        return tuple(roles)

    def dump(self) -> dict[str, Any]:
        """The resolved recipe: every default filled in, as saved in the run folder."""
        out = self.recipe.model_dump(mode="json", exclude={"data", "loss", "update", "evaluators", "rewards"})
        out["data"] = self.data.dump()
        out["loss"] = [{**c.dump(), "weight": c.weight} for c in self.losses]
        out["update"] = self.update.dump()
        out["evaluators"] = [c.dump() for c in self.evaluators]
        out["rewards"] = [{**c.dump(), "weight": c.weight} for c in self.rewards]
        return out


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def read_recipe(path: str | Path, overrides: typing.Sequence[str] = ()) -> dict[str, Any]:
    """Read a YAML recipe with ``yaml.safe_load`` and apply dotted ``key.path=value`` overrides."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"{where}: not valid YAML: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of keys, got {type(raw).__name__}")
    for override in overrides:
        apply_override(raw, override)
    return raw


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set ``a.b.c=value`` in ``raw``; the value is parsed as YAML (``3`` is an int, ``[1, 2]`` a list)."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"override {override!r}: expected key.path=value")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise RecipeError(f"override {override!r}: the value is not valid YAML") from None
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        nxt = _child(node, part, ".".join(parts[: i + 1]))
        if nxt is None:
            nxt = {}
            _set(node, part, nxt, key)
        node = nxt
    _set(node, parts[-1], value, key)


def _child(node: Any, part: str, where: str) -> Any:
    if isinstance(node, list):
        if part.isdigit() and int(part) < len(node):
            return node[int(part)]
        raise RecipeError(f"override {where}: no list item {part}")
    if isinstance(node, dict):
        return node.get(part)
    raise RecipeError(f"override {where}: {type(node).__name__} has no keys")


def _set(node: Any, part: str, value: Any, key: str) -> None:
    if isinstance(node, list):
        if part.isdigit() and int(part) < len(node):
            node[int(part)] = value
            return
        raise RecipeError(f"override {key}: no list item {part}")
    if not isinstance(node, dict):
        raise RecipeError(f"override {key}: cannot set a key inside a {type(node).__name__}")
    node[part] = value


# --------------------------------------------------------------------------------------
# Validating
# --------------------------------------------------------------------------------------


def validate_recipe(raw: dict[str, Any], registry: Registry, source: str | Path | None = None) -> ResolvedRecipe:
    """Validate a recipe and every component's options; raise ``RecipeError`` naming the key path."""
    source = Path(source) if source is not None else None
    base_dir = source.resolve().parent if source is not None else Path.cwd()
    prefix = f"{source}: " if source is not None else ""
    single_loss = isinstance(raw.get("loss"), dict)
    try:
        recipe = Recipe.model_validate(raw, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise RecipeError(prefix + format_errors(exc, Recipe, (), single_loss)) from None

    def component(kind: str, spec: ComponentSpec, key: str) -> Component:
        reg = registry.get(kind, spec.name, f"{prefix}{key}.name")
        options = dict(spec.model_extra or {})
        weight = getattr(spec, "weight", 1.0)
        try:
            config = reg.cls.Config.model_validate(options, context={"base_dir": base_dir, "registry": registry})
        except ValidationError as exc:
            raise RecipeError(prefix + format_errors(exc, reg.cls.Config, tuple(key.split(".")))) from None
        return Component(spec.name, reg.cls, config, weight)

    if not recipe.loss:
        raise RecipeError(f"{prefix}loss: at least one loss is needed")
    resolved = ResolvedRecipe(
        recipe=recipe,
        data=component("data", recipe.data, "data"),
        losses=[
            component("loss", spec, "loss" if single_loss else f"loss.{i}") for i, spec in enumerate(recipe.loss)
        ],
        update=component("update", recipe.update, "update"),
        evaluators=[component("evaluator", s, f"evaluators.{i}") for i, s in enumerate(recipe.evaluators)],
        rewards=[component("reward", s, f"rewards.{i}") for i, s in enumerate(recipe.rewards)],
        source=source,
    )
    _check_compatible(resolved, prefix)
    return resolved


def _check_compatible(resolved: ResolvedRecipe, prefix: str) -> None:
    """The data must provide every field each loss reads; frozen roles need a model or a default."""
    data = resolved.data
    # A data component whose fields depend on its options says so with provided_fields(config).
    fields_for = getattr(data.cls, "provided_fields", None)
    provides = fields_for(data.config) if fields_for is not None else data.cls.provides
    for loss in resolved.losses:
        missing = sorted(set(loss.cls.requires) - set(provides))
        if missing:
            raise RecipeError(
                f"{prefix}loss {loss.name!r} needs batch fields {missing} that data {resolved.data.name!r} "
                f"does not provide (it provides {sorted(provides)})"
            )
    for role in resolved.roles():
        if role not in ("policy", "reference") and role not in resolved.recipe.models:
            raise RecipeError(f"{prefix}models.{role}: the loss needs a {role!r} model; add it under 'models'")


def format_errors(exc: ValidationError, root: type[BaseModel], prefix: tuple[str, ...], single: bool = False) -> str:
    """One line per pydantic error: ``key.path: what was expected``."""
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        if single and loc[:2] == ("loss", 0):
            loc = ("loss", *loc[2:])
        path = ".".join(str(p) for p in (*prefix, *loc)) or "(recipe)"
        if err["type"] == "extra_forbidden":
            allowed = _fields_at(root, tuple(err["loc"])[:-1])
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f", did you mean {close[0]!r}?" if close else f" (allowed: {', '.join(allowed)})"
            lines.append(f"{path}: unknown key{hint}")
        elif err["type"] == "missing":
            lines.append(f"{path}: required key is missing")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, (dict, list)) else f", got {got!r}"
            lines.append(f"{path}: {err['msg'].removeprefix('Value error, ')}{shown}")
    return "; ".join(lines)


def _fields_at(root: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names of the model found at ``loc`` inside ``root`` (list and dict levels skipped)."""
    cls: Any = root
    container = False
    for key in loc:
        if container:
            container = False
            continue
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or key not in cls.model_fields:
            return []
        cls, container = _inner_model(cls.model_fields[key].annotation)
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return list(cls.model_fields)
    return []


def _inner_model(annotation: Any) -> tuple[Any, bool]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    for arg in args:
        found, inner_container = _inner_model(arg)
        if found is not None:
            container = origin in (list, dict, tuple, set) or inner_container
            if origin in (typing.Union, types.UnionType):
                container = inner_container
            return found, container
    return None, False
