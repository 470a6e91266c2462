"""Recipes: YAML in, a validated recipe out, before any model loads.

A recipe refers to components by registered name; each component validates its own
options with its ``Config`` model. Errors name the key path and, for unknown keys,
the close match (``train.lerning_rate: unknown key, did you mean 'learning_rate'?``).
Recipes are read with ``yaml.safe_load`` and never name import paths or run code.
"""

from __future__ import annotations

import copy
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

from .capabilities import capabilities_of
from .errors import RecipeError
from .registry import Registry
from .types import ComponentConfig, reject_bool_for_number


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
    """Unknown keys are errors, and so is a bool where a number is wanted (``max_steps: true``)."""

    model_config = ConfigDict(extra="forbid")

    _no_bool_for_numbers = field_validator("*", mode="before")(reject_bool_for_number)


class ComponentSpec(BaseModel):
    """``name`` picks a registered component; every other key is that component's option."""

    model_config = ConfigDict(extra="allow")
    name: str

    _no_bool_for_numbers = field_validator("*", mode="before")(reject_bool_for_number)


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
    gguf_file: str | None = Field(
        default=None,
        description=(
            "a GGUF file inside 'path' (or a path to one) to load through transformers and the gguf package; "
            "quantized weights are dequantized to 'dtype'"
        ),
    )
    save_merged: bool = Field(
        False, description="a LoRA run also writes model-merged/: base + adapter folded into one plain model"
    )
    adapter: Literal["merge", "continue"] = Field(
        "merge",
        description=(
            "when 'path' is a peft adapter folder (a LoRA run's model/): 'merge' folds it into the base weights "
            "and the update step starts from the merged model; 'continue' keeps training that adapter "
            "(needs update: lora)"
        ),
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.path is None) == (self.config is None):
            raise ValueError("give exactly one of 'path' (a model folder) or 'config' (build from a config)")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("'config' needs a 'model_type' (for example llama or gpt2)")
        if self.config is not None and self.tokenizer is None:
            raise ValueError("a model built from 'config' needs a 'tokenizer' folder")
        if self.gguf_file is not None and self.path is None:
            raise ValueError("'gguf_file' needs 'path' (the folder it is in, or the file itself)")
        return self


class FsdpSpec(StrictModel):
    """Options of ``train.distributed: fsdp`` (FSDP2: ``fully_shard`` per decoder layer, then the root)."""

    reshard_after_forward: bool = Field(
        True,
        description="free each decoder layer's gathered weights after its forward (less memory, one more "
        "all-gather in the backward); false keeps them until the backward",
    )
    cpu_offload: bool = Field(
        False, description="keep the sharded weights, gradients and optimizer state in CPU memory (CUDA runs)"
    )
    param_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="dtype the gathered weights compute in (FSDP mixed precision); null: the weights' own"
    )
    reduce_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="dtype gradients are reduce-scattered in; null: param_dtype"
    )


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
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a non-finite loss or gradient: stop before applying it, or drop that update and go on"
    )
    max_skipped_steps: PositiveInt = Field(
        5, description="stop after this many dropped updates in a row (skip, or fp16 gradient-scaler overflows)"
    )
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: every process holds the whole model; fsdp: FSDP2, weights, gradients and optimizer "
        "state sharded over the processes (one process works too)",
    )
    fsdp: FsdpSpec = Field(default_factory=FsdpSpec, description="options of distributed: fsdp")

    @model_validator(mode="after")
    def _fsdp_options_need_fsdp(self) -> TrainSpec:
        if self.fsdp != FsdpSpec() and self.distributed != "fsdp":  # the defaults are what a dump repeats
            raise ValueError("'fsdp' holds options of distributed: fsdp; set train.distributed: fsdp (or drop them)")
        return self


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
        description="options of lifecycle plugins, by plugin name, validated with the options each registers",
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
    #: What the component declares (``DataCapabilities``, ``LossCapabilities`` ...); None for other kinds.
    capabilities: Any = None

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
    #: Validated options of every lifecycle plugin that registered an options model, by plugin name.
    plugin_options: dict[str, Any] = field(default_factory=dict)
    #: Plugins whose recipe section says ``enabled: false``: their lifecycle hooks are not called.
    disabled_plugins: frozenset[str] = frozenset()

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


class _DuplicateKey(yaml.YAMLError):
    """A key given twice in one mapping: its dotted path, where, and where it was first."""

    def __init__(self, key: str, mark: yaml.Mark, first: yaml.Mark):
        super().__init__(f"{key}: duplicate key")
        self.key, self.mark, self.first = key, mark, first


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (the same tags, nothing runs) that refuses a key given twice in a mapping.

    Plain YAML keeps the last of two equal keys, so a second ``train:`` section would
    silently replace the first. Keys merged in with ``<<`` may still be overridden.
    """

    def construct_document(self, node: yaml.Node) -> Any:
        _check_duplicates(node, (), set())
        return super().construct_document(node)


def _check_duplicates(node: yaml.Node, where: tuple[str, ...], seen: set[int]) -> None:
    """Raise ``_DuplicateKey`` for the first key given twice in a mapping under ``node``."""
    if id(node) in seen:  # an alias: checked where its anchor is
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], yaml.Node] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else "?"
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if (key.tag, key.value) in first:
                    raise _DuplicateKey(".".join((*where, name)), key.start_mark, first[key.tag, key.value].start_mark)
                first[key.tag, key.value] = key
            _check_duplicates(value, (*where, name), seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicates(item, (*where, str(i)), seen)


def _load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys."""
    loader = _RecipeLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _line_of(source: Path | None, keys: typing.Sequence[str], value: Any) -> int | None:
    """The line of a key path in the recipe file, when the file gives it ``value`` (not an override)."""
    if source is None:
        return None
    try:
        text = source.read_text(encoding="utf-8")
        node: Any = yaml.compose(text, Loader=yaml.SafeLoader)
        data: Any = _load_yaml(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    for key in keys:
        if isinstance(data, dict) and key in data:
            data = data[key]
        elif isinstance(data, list) and key.isdigit() and int(key) < len(data):
            data = data[int(key)]
        else:
            return None
    if data != value:
        return None
    line = None
    for key in keys:
        if isinstance(node, yaml.MappingNode):
            found = [(k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == key]
            if not found:
                return None
            line, node = found[-1][0].start_mark.line + 1, found[-1][1]
        elif isinstance(node, yaml.SequenceNode) and key.isdigit() and int(key) < len(node.value):
            node = node.value[int(key)]
            line = node.start_mark.line + 1
        else:
            return None
    return line


def read_recipe(
    path: str | Path, overrides: typing.Sequence[str] = (), defaults: type[BaseModel] | None = None
) -> dict[str, Any]:
    """Read a YAML recipe (``yaml.safe_load``, duplicate keys refused) and apply ``key.path=value`` overrides.

    An override that creates a section starts from that section's default in ``defaults``
    (``Recipe`` unless given): ``update.learning_rate=1e-4`` on a recipe without an
    ``update`` section gives ``{name: full, learning_rate: 1e-4}``.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise RecipeError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at byte offset {exc.start}); "
            "save the recipe as UTF-8"
        ) from None
    try:
        raw = _load_yaml(text)
    except _DuplicateKey as exc:
        raise RecipeError(
            f"{path}:{exc.mark.line + 1}:{exc.mark.column + 1}: {exc.key}: duplicate key "
            f"(first on line {exc.first.line + 1}); give each key once"
        ) from None
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
        apply_override(raw, override, defaults)
    return raw


def apply_override(raw: dict[str, Any], override: str, defaults: type[BaseModel] | None = None) -> None:
    """Set ``a.b.c=value`` in ``raw``; the value is parsed as YAML (``3`` is an int, ``[1, 2]`` a list).

    A section the override creates starts from its default in ``defaults`` (``Recipe``
    unless given) when it has one, so ``update.learning_rate=1e-4`` keeps ``name: full``.
    """
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"override {override!r}: expected key.path=value")
    try:
        value = _load_yaml(text)
    except _DuplicateKey as exc:
        raise RecipeError(f"override {override!r}: the value gives the key {exc.key!r} twice") from None
    except yaml.YAMLError:
        raise RecipeError(f"override {override!r}: the value is not valid YAML") from None
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        nxt = _child(node, part, ".".join(parts[: i + 1]))
        if nxt is None:
            nxt = _default_section(defaults or Recipe, parts[: i + 1])
            _set(node, part, nxt, key)
        node = nxt
    _set(node, parts[-1], value, key)


def _default_section(root: type[BaseModel], parts: typing.Sequence[str]) -> dict[str, Any]:
    """The default of the section at ``parts`` in ``root`` as a dict (``{name: full}`` for ``update``), else ``{}``."""
    cls: Any = root
    container = False
    default: Any = None
    for part in parts:
        if container:  # a list index or a dict key: the item has no default of its own
            container, default = False, None
            continue
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or part not in cls.model_fields:
            return {}
        info = cls.model_fields[part]
        default = info.get_default(call_default_factory=True)
        cls, container = _inner_model(info.annotation)
    if isinstance(default, BaseModel):
        return default.model_dump(mode="json", exclude_unset=True)
    return copy.deepcopy(default) if isinstance(default, dict) else {}


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
    _check_model_configs(recipe, source, prefix)

    def component(kind: str, spec: ComponentSpec, key: str) -> Component:
        reg = registry.get(kind, spec.name, f"{prefix}{key}.name")
        options = dict(spec.model_extra or {})
        weight = getattr(spec, "weight", 1.0)
        try:
            config = reg.cls.Config.model_validate(options, context={"base_dir": base_dir, "registry": registry})
        except ValidationError as exc:
            raise RecipeError(prefix + format_errors(exc, reg.cls.Config, tuple(key.split(".")))) from None
        return Component(spec.name, reg.cls, config, weight, capabilities_of(kind, spec.name, reg.cls, config))

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
    resolved.plugin_options, resolved.disabled_plugins = _plugin_sections(recipe.plugins, registry, prefix, base_dir)
    return resolved


def _plugin_sections(
    sections: dict[str, dict[str, Any]], registry: Registry, prefix: str, base_dir: Path
) -> tuple[dict[str, Any], frozenset[str]]:
    """Validate ``plugins: {name: {...}}``: each name an installed plugin, each mapping its options.

    Every plugin that registered an options model gets its options (defaults when the
    recipe has no section for it); ``enabled: false`` is aligntk's own key in every section.
    """
    known = registry.plugin_options
    options: dict[str, Any] = {}
    disabled: set[str] = set()
    given: dict[str, dict[str, Any]] = {}  # each section without 'enabled'
    for name, raw in sections.items():
        key = f"{prefix}plugins.{name}"
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=1)
            hint = f", did you mean {close[0]!r}?" if close else ""
            raise RecipeError(
                f"{key}: no installed plugin is named {name!r}{hint} (installed: {', '.join(sorted(known)) or 'none'})"
            )
        raw = dict(raw)
        enabled = raw.pop("enabled", True)
        if not isinstance(enabled, bool):
            raise RecipeError(f"{key}.enabled: expected true or false, got {enabled!r}")
        if not enabled:
            disabled.add(name)
        if known[name] is None and raw:
            raise RecipeError(f"{key}.{next(iter(raw))}: unknown key (plugin {name!r} takes no options but 'enabled')")
        given[name] = raw
    for name, model in known.items():
        if model is None:
            continue
        try:
            options[name] = model.model_validate(given.get(name, {}), context={"base_dir": base_dir, "registry": registry})
        except ValidationError as exc:
            raise RecipeError(prefix + format_errors(exc, model, ("plugins", name))) from None
    return options, frozenset(disabled)


def _check_model_configs(recipe: Recipe, source: Path | None, prefix: str) -> None:
    """Each ``config`` section against transformers' config class for its ``model_type`` (no model loads)."""
    from .models import config_problem

    for key, spec in [("model", recipe.model), *((f"models.{role}", s) for role, s in recipe.models.items())]:
        if spec.config is None:
            continue
        problem = config_problem(spec.config)
        if problem is not None:
            inner, message = problem
            keys = (*key.split("."), "config", *([inner] if inner else []))
            line = _line_of(source, keys, spec.config.get(inner) if inner else spec.config)
            where = f"{source}:{line}: " if line is not None else prefix
            raise RecipeError(f"{where}{'.'.join(keys)}: {message}")


def _check_compatible(resolved: ResolvedRecipe, prefix: str) -> None:
    """What each part declares fits the others: batch fields, example fields, roles, whole batches."""
    data = resolved.data
    provides = data.capabilities.provides if data.capabilities.provides is not None else data.cls.provides
    for loss in resolved.losses:
        missing = sorted(set(loss.cls.requires) - set(provides))
        if missing:
            raise RecipeError(
                f"{prefix}loss {loss.name!r} needs batch fields {missing} that data {resolved.data.name!r} "
                f"does not provide (it provides {sorted(provides)})"
            )
        if loss.capabilities.whole_batch and resolved.train.grad_accum > 1:
            raise RecipeError(
                f"{prefix}train.grad_accum: loss {loss.name!r} computes statistics over the whole batch, so it "
                "needs one micro-batch per step: set train.grad_accum: 1 (raise train.batch_size instead)"
            )
    examples = data.capabilities.example_fields
    for i, evaluator in enumerate(resolved.evaluators):
        missing = sorted(evaluator.capabilities.requires - examples) if examples is not None else []
        if missing:
            raise RecipeError(
                f"{prefix}evaluators.{i}: {evaluator.name!r} reads example fields {missing} that data "
                f"{data.name!r} does not give (its examples hold {sorted(examples)})"
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
