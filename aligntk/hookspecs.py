"""Every hook point of aligntk.

Two kinds of hook:

* Registration hooks are called once at start-up. Each receives a ``register``
  callback and calls it once per component: ``register("name", ComponentClass)``
  (``aligntk_register_parts`` also names the kind: ``register("kl", "k3", K3)``).
  Names are global per kind; registering a name another plugin already has is an
  error naming both plugins. The recipe picks a component by name, so nothing
  depends on plugin order.
* Lifecycle hooks are called on every plugin that implements them, on the main
  process only (rank 0), in no guaranteed order. They observe the run; they do not
  change the loop. Return values are ignored unless the hook says otherwise.

A plugin is any module or object with functions decorated ``@aligntk.hookimpl``,
listed under the ``aligntk`` entry-point group of its package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pluggy

from .types import RunInfo

hookspec = pluggy.HookspecMarker("aligntk")

#: ``register(name, component_class)``: the callback every registration hook receives.
Register = Callable[[str, type], None]


# --------------------------------------------------------------------------------------
# Registration: called once at start-up, in every plugin
# --------------------------------------------------------------------------------------


@hookspec
def aligntk_register_data(register: Register) -> None:
    """Register data components: ``register("sft", SFTData)``.

    A data component (``aligntk.types.DataComponent``) reads a source into examples
    (``load(ctx) -> DataSplits``) and collates examples into a batch of tensors
    (``collate(examples) -> Batch``). It owns tokenization, chat templates, label
    masks and truncation, and names the file and line of any bad row. Its
    ``provides`` lists the batch fields ``collate`` returns.
    """


@hookspec
def aligntk_register_losses(register: Register) -> None:
    """Register loss components: ``register("sft", SFTLoss)``.

    A loss (``aligntk.types.LossComponent``) returns a ``LossOutput`` with a sum and
    a count, never a mean: the engine divides by the count over the whole global
    batch (all micro-batches, all processes). ``requires`` lists the batch fields
    it reads, ``roles`` the models it needs (``"policy"``, and frozen ones such as
    ``"reference"``), ``count(batch)`` the units a batch contributes.
    """


@hookspec
def aligntk_register_update_steps(register: Register) -> None:
    """Register update-step components: ``register("full", FullFineTuning)``.

    An update step (``aligntk.types.UpdateStep``) prepares the policy (freezing,
    adapters), builds the optimizer and learning-rate schedule, names the
    gradient-clipping threshold and may add a regularizer (``penalty``).
    """


@hookspec
def aligntk_register_rewards(register: Register) -> None:
    """Register reward components: ``register("exact_match", ExactMatchReward)``.

    A reward (``aligntk.types.RewardComponent``) scores generated completions:
    ``reward(prompts, completions, **fields) -> Tensor [N]``. Online policy
    optimization calls it on rollouts.
    """


@hookspec
def aligntk_register_evaluators(register: Register) -> None:
    """Register evaluators: ``register("exact_match", GenerationExactMatch)``.

    An evaluator (``aligntk.types.Evaluator``) measures a task metric on the
    evaluation examples: ``evaluator(model, tokenizer, examples) -> dict``. The
    engine runs the recipe's evaluators before training, every ``eval_every``
    steps and at the end, on the main process.
    """


@hookspec
def aligntk_register_commands(cli: Any) -> None:
    """Add commands to the ``aligntk`` command line: ``cli.add_command(my_click_command)``.

    ``cli`` is the root ``click.Group``. A method whose workflow spans several runs
    (the weak-to-strong protocol, say) adds its command here; it should build its
    runs with ``aligntk.run_resolved`` so they share the engine. A command name that
    is already taken is an error naming the plugin.
    """


#: ``register(kind, name, part_class)``: the callback ``aligntk_register_parts`` receives.
RegisterPart = Callable[[str, str, type], None]


@hookspec
def aligntk_register_parts(register: RegisterPart) -> None:
    """Register nested parts, components of kinds the plugin defines: ``register("advantage", "gae", GAE)``.

    A part is a small class with a pydantic ``Config``, built as ``Part(config)``, that
    another component's option names with ``aligntk.part(kind)``: the RL plugin's
    advantage estimators, KL estimators and loss aggregations are parts of kinds
    ``advantage``, ``kl`` and ``aggregation``. ``kind`` is any string the plugin chooses
    (other plugins may register parts of the same kind) but not a component kind of a
    registration hook above (``loss`` ...). Names are global per kind: a name registered
    twice is an error naming both plugins; ``aligntk plugins`` lists each part with its kind.
    """


#: ``register(OptionsModel)``: the callback ``aligntk_register_options`` receives.
RegisterOptions = Callable[[type], None]


@hookspec
def aligntk_register_options(register: RegisterOptions) -> None:
    """Register this plugin's recipe options: ``register(MyOptions)``, a pydantic model.

    A plugin with lifecycle hooks has no component section in a recipe; its options live
    under ``plugins: {<plugin name>: {...}}``, keyed by its entry-point name. The model
    validates that mapping at ``aligntk validate`` time, with the same wording as every
    other key (``plugins.diagnostics.windw: unknown key, did you mean 'window'?``); the
    run hands the validated object to lifecycle hooks as ``run.plugin_options[name]``.
    Call ``register`` at most once. Every plugin's section also takes ``enabled: false``,
    which aligntk handles: that plugin's lifecycle hooks are not called in that run.
    A plugin that registers nothing still takes ``enabled``, and no other key.
    """


# --------------------------------------------------------------------------------------
# Lifecycle: called on every plugin that implements them, main process only
# --------------------------------------------------------------------------------------


@hookspec
def aligntk_on_run_start(run: RunInfo) -> None:
    """Called once after models, data and optimizer are ready, before the first step.

    Lifecycle hooks of a plugin whose recipe section says ``enabled: false`` are not called.

    ``run.start_step`` is non-zero when the run resumes from a checkpoint.
    """


@hookspec
def aligntk_on_step_end(run: RunInfo, step: int, metrics: dict[str, float]) -> str | None:
    """Called after each logged optimizer step with that step's metrics.

    ``metrics`` holds ``loss``, ``lr`` (the rate this step used), ``grad_norm``
    (before clipping), ``tokens``, ``tokens_seen``, ``tokens_per_s`` (over the last 20 steps),
    ``step_time``, ``wall_time`` (seconds since the run started)
    and each loss metric. Return a non-empty string to stop the run
    after this step (the string is the reason, reported to the user and written to
    the run folder); return ``None`` to go on. Any one plugin's stop request stops
    the run.
    """


@hookspec
def aligntk_on_eval_end(run: RunInfo, step: int, metrics: dict[str, float]) -> None:
    """Called after each evaluation (``step`` 0 is the evaluation before training).

    ``metrics`` holds ``eval_loss`` (when there is an evaluation split) and the
    evaluators' metrics.
    """


@hookspec
def aligntk_on_checkpoint_saved(run: RunInfo, step: int, path: Path) -> None:
    """Called after a checkpoint for ``step`` is complete at ``path`` (renamed into place).

    Checkpoints beyond ``train.keep_checkpoints`` are already deleted; return values
    are ignored.
    """


@hookspec
def aligntk_on_run_end(run: RunInfo, metrics: dict[str, Any], error: BaseException | None) -> None:
    """Called once when the run ends: normally, stopped by a plugin, or by an error.

    ``metrics`` holds the last step's and last evaluation's values; ``error`` is the
    exception that ended the run, or ``None``.
    """


# --------------------------------------------------------------------------------------
# Benchmark suites: called once at start-up, in every plugin
# --------------------------------------------------------------------------------------

#: ``register(name, path_to_suite_yaml)``: the callback ``aligntk_register_suites`` receives.
RegisterSuite = Callable[[str, str | Path], None]


@hookspec
def aligntk_register_suites(register: RegisterSuite) -> None:
    """Register benchmark suites by name: ``register("arith-methods", Path(__file__).parent / "suite.yaml")``.

    Called once when plugins are loaded; every plugin's implementation is called and the
    names are collected into one table (a name registered twice is an error naming both
    plugins). ``aligntk bench NAME`` runs the suite file registered as ``NAME`` exactly as
    ``aligntk bench path/to/suite.yaml`` would; ``aligntk plugins`` lists the names.
    """
