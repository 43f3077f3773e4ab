"""Models by name, built by their own library's code with its default configuration and its own
initialisation: never downloaded weights, nothing from the network.

==============================  ===============================================================
spec                            built by
==============================  ===============================================================
``torchvision:resnet50``        ``torchvision.models.get_model(name, weights=None)`` (and
                                ``weights_backbone=None`` where the builder takes it)
``timm:vit_small_patch16_224``  ``timm.create_model(name, pretrained=False)``
``hf:gpt2``                     ``AutoConfig.for_model("gpt2")`` (the model type's default config,
                                no download), then the first of ``AutoModelForSeq2SeqLM``,
                                ``AutoModelForMaskedLM``, ``AutoModelForCausalLM``,
                                ``AutoModelForImageClassification``, ``AutoModel`` that knows it
``mypkg.models:make``           ``make()`` from the module ``mypkg.models``
``path/to/file.py:make``        ``make()`` from that file, loaded by path
==============================  ===============================================================

Any spec may end with keyword arguments in brackets, ``hf:gpt2[n_layer=2]`` or
``timm:vit_tiny_patch16_224[num_classes=10]``: they go to the config (transformers), to
``create_model`` (timm), to the builder (torchvision) or to the factory. Values are Python
literals, else strings.

A user module is imported without shadowing: the current folder (for ``module:factory``) or the
file's folder (for ``file.py:factory``) is appended to the *end* of ``sys.path`` if it is not on
it, so a ``secrets.py`` or ``random.py`` lying in the current folder never replaces the standard
library module of that name. A factory returns a model, or ``(model, batch)`` (the batch is then
the example input).

torchvision, timm and transformers are optional (``pip install 'initlab[models]'``) and imported
only when a spec needs them, after :func:`initlab._compat.ensure_torchvision`.
"""
from __future__ import annotations

import ast
import contextlib
import difflib
import importlib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._compat import ensure_torchvision
from ._errors import InitlabError
from ._layers import guess_input_shape

__all__ = ["build", "build_model", "load", "Built", "LIBRARIES", "EXTRA", "parse_spec", "example_inputs"]

#: the library prefixes of a spec -> the package that provides them
LIBRARIES = {"torchvision": "torchvision", "timm": "timm", "hf": "transformers"}
#: the extra that installs them
EXTRA = "models"
_OPTIONAL = set(LIBRARIES.values())
_HF_HEADS = ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
             "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES")
_HF_CLASSES = ("AutoModelForSeq2SeqLM", "AutoModelForMaskedLM", "AutoModelForCausalLM",
               "AutoModelForImageClassification")
_BATCH = 2


@dataclass
class Built:
    """A model built from a spec: the model, where it came from, and an example input for one
    forward pass (``inputs``: positional arguments, ``kwargs``: keyword arguments; both empty
    when no default input is known, ``input_note`` says why)."""

    spec: str
    library: str  # "torchvision", "timm", "hf" or "factory"
    name: str
    model: nn.Module
    inputs: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    input_note: str = ""

    @property
    def has_input(self) -> bool:
        return bool(self.inputs or self.kwargs)


# --------------------------------------------------------------------------------------------
# specs


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _options(text: str, spec: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip().isidentifier():
            raise InitlabError(f"{spec}: options in brackets are key=value pairs, e.g. hf:gpt2[n_layer=2], got {part!r}")
        out[key.strip()] = _literal(value.strip())
    return out


def parse_spec(spec: str) -> tuple[str, str, dict[str, Any]]:
    """``(library, name, options)`` of a spec; library is ``"factory"`` for ``module:factory`` and
    ``file.py:factory`` (then name is the whole ``target:factory``)."""
    if not isinstance(spec, str) or not spec.strip():
        raise InitlabError(f"a model spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    opts: dict[str, Any] = {}
    m = re.fullmatch(r"(.*)\[(.*)\]", spec, flags=re.S)
    if m:
        spec, opts = m.group(1), _options(m.group(2), spec)
    lib, colon, name = spec.partition(":")
    if colon and lib in LIBRARIES:
        if not name:
            raise InitlabError(f"{spec}: no model name after {lib + ':'!r} (e.g. {lib}:{_EXAMPLES[lib]})")
        return lib, name, opts
    target, colon, attr = spec.rpartition(":")
    if not colon or not target or not attr or not attr.isidentifier():
        raise InitlabError(f"expected LIBRARY:MODEL ({', '.join(f'{k}:{v}' for k, v in _EXAMPLES.items())}) or "
                           f"MODULE:FACTORY / FILE.py:FACTORY, got {spec!r}")
    return "factory", spec, opts


_EXAMPLES = {"torchvision": "resnet50", "timm": "vit_small_patch16_224", "hf": "gpt2"}


def _unknown(lib: str, name: str, choices: list[str], where: str) -> InitlabError:
    close = difflib.get_close_matches(name.lower(), [c.lower() for c in choices], n=3, cutoff=0.5)
    lowered = {c.lower(): c for c in choices}
    hint = f"; closest: {', '.join(lowered[c] for c in close)}" if close else ""
    return InitlabError(f"unknown {lib} model {name!r}{hint} (all {len(choices)} names: {where})")


@contextlib.contextmanager
def _optional(spec: str) -> Iterator[None]:
    """A missing optional package becomes one line naming the extra to install."""
    try:
        yield
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top not in _OPTIONAL:
            raise
        raise InitlabError(f"{spec} needs the optional package {top!r}: pip install 'initlab[{EXTRA}]'") from e


# --------------------------------------------------------------------------------------------
# the libraries


def _torchvision(name: str, opts: dict[str, Any]) -> nn.Module:
    ensure_torchvision()
    import torchvision.models as tvm

    if name not in tvm.list_models():
        raise _unknown("torchvision", name, tvm.list_models(), "torchvision.models.list_models()")
    builder = tvm.get_model_builder(name)
    params = inspect.signature(builder).parameters
    kwargs = {"weights": None, **opts}
    if "weights_backbone" in params:
        kwargs.setdefault("weights_backbone", None)
    return builder(**kwargs)


def _timm(name: str, opts: dict[str, Any]) -> nn.Module:
    ensure_torchvision()
    import timm

    if not timm.is_model(name):
        raise _unknown("timm", name, timm.list_models(), "timm.list_models()")
    return timm.create_model(name, pretrained=False, **opts)


def _hf(name: str, opts: dict[str, Any]) -> nn.Module:
    ensure_torchvision()
    import transformers
    from transformers.models.auto import modeling_auto

    types = sorted(transformers.CONFIG_MAPPING.keys())
    if name not in types:
        raise _unknown("hf", name, types, "transformers.CONFIG_MAPPING, model types such as gpt2, bert, t5, vit")
    config = transformers.AutoConfig.for_model(name, **opts)
    auto_name = next((cls for mapping, cls in zip(_HF_HEADS, _HF_CLASSES)
                      if name in getattr(modeling_auto, mapping, {})), "AutoModel")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        return getattr(transformers, auto_name).from_config(config)
    finally:
        transformers.logging.set_verbosity(verbosity)


def _on_path_last(folder: str) -> None:
    """Append ``folder`` to the end of ``sys.path`` unless it is on it (``""`` counts as the current folder)."""
    real = os.path.realpath(folder)
    present = {os.path.realpath(p or os.getcwd()) for p in sys.path if isinstance(p, str)}
    if real not in present:
        sys.path.append(real)


def _user_module(target: str, spec: str) -> Any:
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = os.path.abspath(target)
        if not os.path.isfile(path):
            raise InitlabError(f"{spec}: file {target!r} not found")
        _on_path_last(os.path.dirname(path))
        stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
        mod_name = f"_initlab_factory_{stem}_{abs(hash(path)) % 10**8}"
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise InitlabError(f"{spec}: cannot load {target!r} as a Python file")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[mod_name] = module  # dataclasses and pickling look the module up here
        try:
            loader_spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(mod_name, None)
            raise
        return module
    _on_path_last(os.getcwd())
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as e:
        if e.name and (target == e.name or target.startswith(e.name + ".")):
            libs = "" if "." in target else f"; model libraries are {', '.join(k + ':' for k in LIBRARIES)}"
            raise InitlabError(f"{spec}: no module named {e.name!r} (not installed, and not in the current folder "
                               f"{os.getcwd()!r}){libs}") from e
        raise


def _factory(spec: str, opts: dict[str, Any]) -> tuple[nn.Module, Any]:
    target, _, attr = spec.rpartition(":")
    try:
        module = _user_module(target, spec)
    except InitlabError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's module failed: one line, with its error
        raise InitlabError(f"{spec}: importing {target!r} failed: {type(e).__name__}: {e}") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        names = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
        close = difflib.get_close_matches(attr, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; its callables: {', '.join(names[:12]) or 'none'}"
        raise InitlabError(f"{spec}: {target!r} has no factory {attr!r}{hint}")
    try:
        made = factory(**opts)
    except Exception as e:  # noqa: BLE001 - the user's factory failed: one line, with its error
        raise InitlabError(f"{spec}: the factory raised {type(e).__name__}: {e}") from e
    batch = None
    if isinstance(made, tuple) and made and isinstance(made[0], nn.Module):
        made, batch = made[0], (made[1] if len(made) > 1 else None)
    if not isinstance(made, nn.Module):
        raise InitlabError(f"{spec}: the factory must return an nn.Module or (model, batch), got {type(made).__name__}")
    return made, batch


# --------------------------------------------------------------------------------------------
# example inputs


def _image(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(_BATCH, *shape)


def _torchvision_inputs(name: str, model: nn.Module) -> tuple[tuple[Any, ...], str]:
    import torchvision.models as tvm

    where = tvm.get_model_builder(name).__module__
    size = getattr(model, "image_size", 224)
    size = size if isinstance(size, int) else 224
    if ".detection" in where:
        return ([torch.rand(3, size, size) for _ in range(_BATCH)],), f"{_BATCH} images 3x{size}x{size}"
    if ".video" in where:
        return (_image((3, 8, 112, 112)),), f"{_BATCH}x3x8x112x112 N(0,1) clips"
    if ".optical_flow" in where:
        return (_image((3, 128, 128)), _image((3, 128, 128))), f"2 frames {_BATCH}x3x128x128"
    return (_image((3, size, size)),), f"{_BATCH}x3x{size}x{size} N(0,1)"


def _hf_inputs(model: nn.Module) -> tuple[dict[str, Any], str]:
    config = getattr(model, "config", None)
    main = getattr(model, "main_input_name", "input_ids")
    if main == "input_ids":
        vocab = int(getattr(config, "vocab_size", 0) or 100)
        ids = torch.randint(0, vocab, (_BATCH, 16))
        kwargs: dict[str, Any] = {"input_ids": ids}
        if getattr(config, "is_encoder_decoder", False):
            kwargs["decoder_input_ids"] = ids
        return kwargs, f"{_BATCH}x16 random token ids"
    if main == "pixel_values":
        size = getattr(config, "image_size", 224)
        size = size if isinstance(size, int) else int(size[0])
        ch = int(getattr(config, "num_channels", 3))
        return {"pixel_values": _image((ch, size, size))}, f"{_BATCH}x{ch}x{size}x{size} N(0,1) pixels"
    return {}, f"no default input for {main!r}"


def example_inputs(library: str, name: str, model: nn.Module, batch: Any = None) -> tuple[tuple[Any, ...], dict[str, Any], str]:
    """``(args, kwargs, note)``: a small input the model accepts, by the library's conventions
    (images 3x224x224 or the model's own size, token ids, a factory's batch, or N(0, 1) values
    shaped for the first Linear/Conv layer); ``((), {}, why)`` when none is known."""
    if any(p.is_meta for p in model.parameters()):
        return (), {}, "meta tensors: no forward pass"
    if library == "torchvision":
        args, note = _torchvision_inputs(name, model)
        return args, {}, note
    if library == "timm":
        cfg = getattr(model, "pretrained_cfg", None) or {}
        shape = tuple(cfg.get("input_size", (3, 224, 224)))
        return (_image(shape),), {}, f"{_BATCH}x{'x'.join(map(str, shape))} N(0,1)"
    if library == "hf":
        kwargs, note = _hf_inputs(model)
        return (), kwargs, note
    if batch is not None:
        return (batch if isinstance(batch, tuple) else (batch,)), {}, "the factory's batch"
    shape = guess_input_shape(model)
    if shape is None:
        return (), {}, "input shape unknown (return (model, batch) from the factory)"
    return (torch.randn(8, *shape),), {}, f"8x{'x'.join(map(str, shape))} N(0,1), shape guessed from the first layer"


# --------------------------------------------------------------------------------------------
# the entry points


def _construct(lib: str, name: str, opts: dict[str, Any], spec: str) -> tuple[nn.Module, Any]:
    with _optional(spec):
        if lib == "torchvision":
            return _torchvision(name, opts), None
        if lib == "timm":
            return _timm(name, opts), None
        if lib == "hf":
            return _hf(name, opts), None
    return _factory(name, opts)


def load(spec: str, *, device: str | torch.device | None = None, inputs: bool = True, **options: Any) -> Built:
    """Build the model of ``spec`` (see the module docstring) with its library's own init, and an example input.

    ``device="meta"`` builds it without memory (shapes only; no example input). ``options`` are
    added to the spec's bracket options. Errors are :class:`InitlabError` with one line: an
    unknown library or model (with the closest valid names), a missing optional package (with
    the extra to install), a factory that fails or returns something else than a model.
    """
    lib, name, opts = parse_spec(spec)
    opts.update(options)
    ctx = torch.device(device) if device is not None else contextlib.nullcontext()
    with ctx:
        model, batch = _construct(lib, name, opts, spec)
    label = name.rpartition(":")[2] if lib == "factory" else f"{lib}:{name}"
    built = Built(spec=spec, library=lib, name=label, model=model)
    if inputs:
        try:
            with _optional(spec):
                built.inputs, built.kwargs, built.input_note = example_inputs(lib, name, model, batch)
        except Exception as e:  # noqa: BLE001 - no example input is not an error of the build
            built.input_note = f"no example input ({type(e).__name__}: {e})"
    return built


def build(spec: str, *, device: str | torch.device | None = None, **options: Any) -> nn.Module:
    """The model of ``spec``: ``build("torchvision:resnet50")``, ``build("timm:vit_small_patch16_224")``,
    ``build("hf:gpt2", n_layer=2)``, ``build("mypkg.models:make")``, ``build("models.py:make")``;
    ``device="meta"`` for shapes only. See :func:`load`."""
    return load(spec, device=device, inputs=False, **options).model


#: ``initlab.build_model``: the public name of :func:`build`
build_model = build
