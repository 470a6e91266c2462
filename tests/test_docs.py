"""Keep the documentation in step with the code.

* ``docs/hooks.md`` has one section per hook in ``aligntk.hookspecs``, headed by the hook
  name, whose python code block holds the hook's exact signature as written in the
  source; it names no hook that does not exist.
* Every hookspec's docstring has at least two sentences (when it is called, and how
  results combine or what the arguments hold).
* ``docs/recipes.md`` documents every field of ``Recipe``, ``ModelSpec`` and ``TrainSpec``
  as a table row (and no field that does not exist).
"""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
from pathlib import Path
from typing import Any, Callable

import pytest

from aligntk import hookspecs
from aligntk.recipe import ModelSpec, Recipe, TrainSpec

DOCS = Path(__file__).resolve().parents[1] / "docs"

HOOKS: dict[str, Callable[..., Any]] = {
    name: fn
    for name, fn in vars(hookspecs).items()
    if name.startswith("aligntk_") and inspect.isfunction(fn) and fn.__module__ == hookspecs.__name__
}


def _normalize(text: str) -> str:
    """One line, single spaces, no padding inside brackets, no trailing comma or colon."""
    text = " ".join(text.split())
    text = re.sub(r"([(\[])\s+", r"\1", text)
    text = re.sub(r",?\s+([)\]])", r"\1", text)
    return text.rstrip(":").strip()


def _source_def(fn: Callable[..., Any]) -> str:
    """The ``def name(...) -> ...`` header as written in the source, decorators and body left out."""
    source = textwrap.dedent(inspect.getsource(fn))
    node = ast.parse(source).body[0]
    assert isinstance(node, ast.FunctionDef)
    lines = source.splitlines()
    header = lines[node.lineno - 1 : node.body[0].lineno - 1]
    return _normalize("\n".join(header))


def _signature_def(fn: Callable[..., Any]) -> str:
    """The same header rebuilt from ``inspect.signature``; string annotations are shown unquoted.

    ``hookspecs`` uses ``from __future__ import annotations``, so every annotation is the
    source text of the annotation.
    """
    sig = inspect.signature(fn)

    def show(annotation: Any) -> str:
        return annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)

    params = []
    for p in sig.parameters.values():
        text = p.name if p.annotation is inspect.Parameter.empty else f"{p.name}: {show(p.annotation)}"
        if p.default is not inspect.Parameter.empty:
            text += f" = {p.default!r}"
        params.append(text)
    returns = "" if sig.return_annotation is inspect.Signature.empty else f" -> {show(sig.return_annotation)}"
    return f"def {fn.__name__}({', '.join(params)}){returns}"


def _sections(markdown: str) -> dict[str, str]:
    """Heading text (backticks stripped) -> the text up to the next heading of the same or higher level."""
    headings = [
        (m.start(), m.end(), len(m.group(1)), m.group(2).strip().strip("`").strip())
        for m in re.finditer(r"^(#{1,6})\s+(.+?)\s*$", markdown, re.M)
    ]
    out: dict[str, str] = {}
    for i, (_, end, level, title) in enumerate(headings):
        stop = next((s for s, _, lvl, _ in headings[i + 1 :] if lvl <= level), len(markdown))
        out[title] = markdown[end:stop]
    return out


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.M | re.S)


@pytest.fixture(scope="module")
def hooks_md() -> str:
    return (DOCS / "hooks.md").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def recipes_md() -> str:
    return (DOCS / "recipes.md").read_text(encoding="utf-8")


def test_hooks_are_the_hookspecs_the_loader_and_the_engine_call() -> None:
    """``HOOKS`` (what the tests below run over) is every hookspec pluggy knows, and nothing else.

    Each is either a registration hook ``load_plugins`` collects or a lifecycle hook that a
    ``Plugins.on_*`` wrapper calls.
    """
    import pluggy

    from aligntk.plugins import OPTIONS_HOOK, PARTS_HOOK, SUITES_HOOK, Plugins
    from aligntk.registry import KINDS

    pm = pluggy.PluginManager("aligntk")
    pm.add_hookspecs(hookspecs)
    specs = {name for name in vars(pm.hook) if name.startswith("aligntk_")}
    registration = {*KINDS.values(), "aligntk_register_commands", PARTS_HOOK, SUITES_HOOK, OPTIONS_HOOK}
    lifecycle = {f"aligntk_{name}" for name in vars(Plugins) if name.startswith("on_")}
    assert sorted(HOOKS) == sorted(specs) == sorted(registration | lifecycle)


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_signature_text_matches_source(name: str) -> None:
    # The rebuilt signature must equal the source: the docs are compared with the source text.
    assert _signature_def(HOOKS[name]) == _source_def(HOOKS[name])


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_hook_has_section_with_exact_signature(name: str, hooks_md: str) -> None:
    sections = _sections(hooks_md)
    assert name in sections, f"docs/hooks.md has no section headed {name!r}"
    expected = _source_def(HOOKS[name])
    blocks = [_normalize(b) for b in _python_blocks(sections[name])]
    assert expected in blocks, (
        f"docs/hooks.md, section {name}: no python code block is exactly\n    {expected}\n"
        f"(found: {blocks[:2]})"
    )


def test_hooks_md_names_no_missing_hook(hooks_md: str) -> None:
    named = set(re.findall(r"\baligntk_(?:register|on)_\w+", hooks_md))
    headed = {t for t in _sections(hooks_md) if t.startswith("aligntk_")}
    unknown = sorted((named | headed) - set(HOOKS))
    assert not unknown, f"docs/hooks.md names hooks that aligntk.hookspecs does not have: {unknown}"


def _sentences(docstring: str) -> int:
    text = re.sub(r"``.*?``", "Code", " ".join(docstring.split()), flags=re.S)
    # A sentence ends with . ! or ? followed by the end or by a capitalised word.
    return len(re.findall(r"[.!?](?=\s+[A-Z(`\"]|\s*$)", text))


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_hookspec_docstring_has_two_sentences(name: str) -> None:
    doc = inspect.getdoc(HOOKS[name]) or ""
    assert _sentences(doc) >= 2, f"{name}: the docstring needs at least two sentences, got {doc!r}"


SPEC_SECTIONS = {Recipe: "Top-level keys", ModelSpec: "model and models", TrainSpec: "train"}


@pytest.mark.parametrize("model", list(SPEC_SECTIONS), ids=lambda m: m.__name__)
def test_recipes_md_documents_every_field(model: type, recipes_md: str) -> None:
    heading = SPEC_SECTIONS[model]
    sections = _sections(recipes_md.replace("`", ""))
    assert heading in sections, f"docs/recipes.md has no section {heading!r}"
    documented = set(re.findall(r"^\|\s*(\w+)\s*\|", sections[heading], re.M)) - {"key"}
    fields = set(model.model_fields)
    assert not fields - documented, f"docs/recipes.md, {heading}: undocumented keys {sorted(fields - documented)}"
    assert not documented - fields, f"docs/recipes.md, {heading}: keys that do not exist {sorted(documented - fields)}"
    for field in fields:
        assert f"`{field}`" in recipes_md


def test_the_complete_recipe_is_the_quickstart(recipes_md: str) -> None:
    """The recipe shown under "A complete recipe" is ``recipes/quickstart.yaml``, key for key."""
    import yaml

    section = _sections(recipes_md)["A complete recipe"]
    assert "recipes/quickstart.yaml" in section
    blocks = re.findall(r"^```yaml\n(.*?)^```", section, re.M | re.S)
    assert len(blocks) == 1, "the section shows one yaml block"
    quickstart = yaml.safe_load((DOCS.parent / "recipes" / "quickstart.yaml").read_text(encoding="utf-8"))
    assert yaml.safe_load(blocks[0]) == quickstart
