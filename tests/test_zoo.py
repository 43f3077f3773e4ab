"""The model zoo: specs, the three libraries built from their own code (on the meta device here:
only shapes are needed), user factories, clear one-line errors, and no shadowing of standard modules."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from initlab import InitlabError
from initlab._zoo import build, load, parse_spec

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here downloads; make sure of it


def needs(package: str) -> None:
    """Skip without ``package`` (found, not imported: torchvision must not be imported before the shim)."""
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (pip install 'initlab[models]')")


def test_parse_spec():
    assert parse_spec("torchvision:resnet50") == ("torchvision", "resnet50", {})
    assert parse_spec("hf:gpt2[n_layer=2, activation_function='relu']") == \
        ("hf", "gpt2", {"n_layer": 2, "activation_function": "relu"})
    assert parse_spec("timm:vit_tiny_patch16_224[num_classes=10]") == ("timm", "vit_tiny_patch16_224", {"num_classes": 10})
    assert parse_spec("mypkg.models:make") == ("factory", "mypkg.models:make", {})
    assert parse_spec("path/to/file.py:make[width=8]") == ("factory", "path/to/file.py:make", {"width": 8})
    for bad in ("resnet50", "", "hf:", "mod:", "mod:not-an-identifier", "hf:gpt2[n_layer]"):
        with pytest.raises(InitlabError):
            parse_spec(bad)


def _meta(model: nn.Module) -> bool:
    return all(p.is_meta for p in model.parameters())


def test_torchvision_on_meta():
    needs("torchvision")
    m = build("torchvision:resnet50", device="meta")
    assert type(m).__name__ == "ResNet" and _meta(m)
    assert sum(p.numel() for p in m.parameters()) == 25_557_032


def test_timm_on_meta():
    needs("timm")
    m = build("timm:vit_small_patch16_224", device="meta")
    assert type(m).__name__ == "VisionTransformer" and _meta(m) and len(m.blocks) == 12


def test_hf_from_the_default_config_on_meta():
    needs("transformers")
    m = build("hf:gpt2", device="meta")
    assert type(m).__name__ == "GPT2LMHeadModel" and _meta(m) and len(m.transformer.h) == 12
    small = build("hf:gpt2[n_layer=2]", device="meta")
    assert len(small.transformer.h) == 2
    assert len(build("hf:gpt2", device="meta", n_layer=1).transformer.h) == 1  # keyword options too
    assert type(build("hf:bert", device="meta")).__name__ == "BertForMaskedLM"


@pytest.mark.parametrize("spec, closest", [
    ("torchvision:resnet5O", "resnet50"),
    ("timm:vit_smal_patch16_224", "vit_small_patch16_224"),
    ("hf:gtp2", "gpt2"),
])
def test_unknown_model_names_the_closest(spec, closest):
    needs({"torchvision": "torchvision", "timm": "timm", "hf": "transformers"}[spec.split(":")[0]])
    with pytest.raises(InitlabError) as e:
        build(spec, device="meta")
    msg = str(e.value)
    assert "\n" not in msg and spec.split(":")[1] in msg and closest in msg.split("closest:")[1]


@pytest.mark.parametrize("spec, package", [("timm:resnet18", "timm"), ("hf:gpt2", "transformers")])
def test_a_missing_library_names_the_extra(spec, package, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if not installed
    with pytest.raises(InitlabError) as e:
        build(spec, device="meta")
    assert str(e.value) == f"{spec} needs the optional package {package!r}: pip install 'initlab[models]'"


FACTORIES = '''
import torch
from torch import nn

def make(width=8):
    return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 2))

def with_batch():
    return make(), torch.randn(5, 4)

def boom():
    raise ValueError("no GPU here")

def not_a_model():
    return 42
'''


@pytest.fixture
def factories(tmp_path):
    path = tmp_path / "facts.py"
    path.write_text(FACTORIES)
    return path


def test_factories_from_a_file(factories):
    m = build(f"{factories}:make")
    assert isinstance(m, nn.Sequential) and m[0].out_features == 8
    assert build(f"{factories}:make[width=3]")[0].out_features == 3
    built = load(f"{factories}:with_batch")
    assert built.inputs[0].shape == (5, 4) and built.input_note == "the factory's batch"
    guessed = load(f"{factories}:make")
    assert guessed.inputs[0].shape[1:] == (4,) and "guessed" in guessed.input_note


def test_factories_from_a_module(factories, monkeypatch):
    monkeypatch.chdir(factories.parent)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(factories.parent))])
    assert isinstance(build("facts:make"), nn.Sequential)
    assert sys.path[-1] == os.path.realpath(factories.parent)  # appended last, never first


@pytest.mark.parametrize("name, words", [
    ("boom", ["the factory raised ValueError: no GPU here"]),
    ("not_a_model", ["must return an nn.Module", "int"]),
    ("mak", ["has no factory 'mak'", "did you mean make"]),
])
def test_factory_errors_are_one_line(factories, name, words):
    with pytest.raises(InitlabError) as e:
        build(f"{factories}:{name}")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{factories}:{name}")
    assert all(w in msg for w in words), msg


def test_missing_module_or_file(tmp_path):
    with pytest.raises(InitlabError, match="no module named 'no_such_mod_xyz'"):
        build("no_such_mod_xyz:make")
    with pytest.raises(InitlabError, match="not found"):
        build(f"{tmp_path}/absent.py:make")


SHADOW = "raise SystemExit('the local secrets.py was imported')\n"
USER = "import secrets\nfrom torch import nn\n\ndef make():\n    return nn.Linear(2, 2)\n\ndef where():\n    return secrets.__file__\n"


@pytest.fixture
def shadow_dir(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "secrets.py").write_text(SHADOW)
    (work / "mymod.py").write_text(USER)
    runner = tmp_path / "runner"
    runner.mkdir()
    return work, runner


def test_a_local_module_never_shadows_the_standard_library(shadow_dir):
    work, runner = shadow_dir
    script = runner / "run.py"  # a script elsewhere: Python puts its folder first, not the current folder
    script.write_text(textwrap.dedent("""
        import importlib, sys
        from initlab._zoo import build
        for spec in sys.argv[1:]:
            build(spec)
        import mymod
        print(mymod.where())
    """))
    for spec in ("mymod:make", f"{work / 'mymod.py'}:make"):
        out = subprocess.run([sys.executable, str(script), spec], cwd=work, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert os.path.dirname(out.stdout.strip()) != str(work)  # the standard library's secrets


def test_the_shadowing_check_is_not_blind(shadow_dir):
    # negative control: with the current folder first on sys.path (python -c), the local file wins
    work, _ = shadow_dir
    out = subprocess.run([sys.executable, "-c", "import mymod"], cwd=work, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "the local secrets.py was imported" in out.stderr


def test_meta_device_for_a_factory(factories):
    m = build(f"{factories}:make", device="meta")
    assert _meta(m)
    assert torch.empty(1).device.type == "cpu"  # the device context does not leak
