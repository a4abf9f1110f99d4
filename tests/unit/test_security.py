"""Source checks for the service's security rules: no unpickling, no shell strings, no eval.

Models and path graphs come from storage other people can write to, so nothing the project reads may run code
when loaded: weights are safetensors, tables Parquet, records JSON. These checks read the source (AST), so a new
``pickle.load`` or ``torch.load`` without ``weights_only=True`` fails CI wherever it is added, also under an alias,
a from-import or ``importlib``. Each rule has a snippet it must catch (``test_the_checker_catches_each_rule``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("mip_core", "tasks", "flows", "benches")
SOURCES = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _name(node: ast.AST) -> str:
    """Dotted name of a call target (``torch.load``, ``m.to(d).eval`` -> ``?.eval``); '' for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value) or '?'}.{node.attr}"  # '?': a call or subscript, e.g. model.to(d).eval
    return ""


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


#: torch.distributed collectives that pickle what they carry (and unpickle what other ranks send).
OBJECT_COLLECTIVES = ("all_gather_object", "gather_object", "broadcast_object_list", "scatter_object_list",
                      "send_object_list", "recv_object_list")
#: The marker a line using one must carry, saying why its peers are trusted (the ranks of one job).
TRUSTED_PEERS = "# trusted peers:"


#: Modules whose loading unpickles, i.e. runs code chosen by whoever wrote the file.
PICKLERS = ("pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "jsonpickle")


def violations(source: str, filename: str = "<src>") -> list[str]:
    tree = ast.parse(source, filename)
    aliases, lines = _aliases(tree), source.splitlines()
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and any(map(_is_pickler, _imported(node))):
            out.append(f"{filename}:{node.lineno}: imports a pickle-based serializer")
        if isinstance(node, ast.Call):
            name = _resolved(_name(node.func), aliases)
            problems = _unpickling(node, name, aliases) + _other_problems(node, name, lines[node.lineno - 1])
            out += [f"{filename}:{node.lineno}: {why}" for why in problems]
    return out


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> the dotted name it stands for (``np`` -> ``numpy``, ``load`` -> ``torch.load``), so that an
    ``as`` or a from-import does not hide a call from the rules."""
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.asname: a.name for a in node.names if a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out |= {a.asname or a.name: f"{node.module}.{a.name}" for a in node.names}
    return out


def _resolved(name: str, aliases: dict[str, str]) -> str:
    head, dot, rest = name.partition(".")
    return aliases.get(head, head) + dot + rest


def _imported(node: ast.Import | ast.ImportFrom) -> list[str]:
    return [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])


def _is_pickler(module: str) -> bool:
    return module.split(".")[0] in PICKLERS


def _unpickling(call: ast.Call, name: str, aliases: dict[str, str]) -> list[str]:
    """The rules on loading: each of these calls can run code from the file (or module) it loads."""
    out = []
    if name in ("torch.load", "torch.serialization.load") and not _is_true(_keyword(call, "weights_only")):
        out.append("torch.load without weights_only=True")
    allow = _keyword(call, "allow_pickle")
    if name.split(".")[0] in ("np", "numpy") and name.endswith(".load") and allow is not None and not (
            isinstance(allow, ast.Constant) and allow.value is False):
        out.append(f"numpy.load(allow_pickle={ast.unparse(allow)})")
    if name.split(".")[-1] == "read_pickle":
        out.append(f"{name} unpickles")
    first = call.args[0] if call.args else None
    if name in ("importlib.import_module", "__import__") and isinstance(first, ast.Constant) and isinstance(
            first.value, str) and _is_pickler(first.value):
        out.append(f"imports a pickle-based serializer ({name}({first.value!r}))")
    loader = _keyword(call, "Loader")
    if name in ("yaml.load", "yaml.unsafe_load") and (loader is None or _resolved(_name(loader), aliases) not in (
            "yaml.SafeLoader", "SafeLoader", "yaml.CSafeLoader")):
        out.append("yaml.load without SafeLoader")
    return out


def _other_problems(call: ast.Call, name: str, line: str) -> list[str]:
    """Pickling across ranks without saying why the peers are trusted, eval/exec, and shell command strings."""
    out = []
    if name.split(".")[-1] in OBJECT_COLLECTIVES and TRUSTED_PEERS not in line:
        out.append(f"{name.split('.')[-1]} pickles across ranks; only between the ranks of one job, marked "
                   f"`{TRUSTED_PEERS} <why>` on the line")
    if name in ("eval", "exec"):
        out.append(f"{name}()")
    if (name.split(".")[0] == "subprocess" and _is_true(_keyword(call, "shell"))) or name in ("os.system",
                                                                                          "os.popen"):
        out.append(f"a shell command string ({name})")
    return out


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_unsafe_loading_or_shell(path):
    assert violations(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT))) == []


@pytest.mark.parametrize("snippet, found", [
    ("import pickle\npickle.loads(b'')", "pickle-based serializer"),
    ("import torch\ntorch.load('x.pt')", "torch.load without weights_only=True"),
    ("import torch\ntorch.load('x.pt', weights_only=False)", "torch.load without weights_only=True"),
    ("import numpy as np\nnp.load('x.npy', allow_pickle=True)", "allow_pickle"),
    ("import yaml\nyaml.load(open('f'))", "SafeLoader"),
    ("import subprocess\nsubprocess.run('ls', shell=True)", "shell command string"),
    ("import os\nos.system('ls')", "shell command string"),
    ("eval('1')", "eval()"),
    ("import torch.distributed as dist\ndist.all_gather_object(out, x)", "pickles across ranks"),
    ("from torch import distributed\ndistributed.broadcast_object_list(objs)", "pickles across ranks"),
    # the other picklers, and the calls that unpickle under another name
    ("import cloudpickle\ncloudpickle.loads(b'')", "pickle-based serializer"),
    ("from cloudpickle import loads", "pickle-based serializer"),
    ("import dill as d\nd.load(f)", "pickle-based serializer"),
    ("import joblib\njoblib.load('model.joblib')", "pickle-based serializer"),
    ("from joblib import load", "pickle-based serializer"),
    ("from sklearn.externals import joblib", "pickle-based serializer"),
    ("import shelve\nshelve.open('db')", "pickle-based serializer"),
    ("import importlib\nimportlib.import_module('cloudpickle')", "pickle-based serializer"),
    ("__import__('dill')", "pickle-based serializer"),
    ("from torch import load\nload('x.pt')", "torch.load without weights_only=True"),
    ("import torch as t\nt.load('x.pt', weights_only=trusted)", "torch.load without weights_only=True"),
    ("import torch\ntorch.serialization.load('x.pt')", "torch.load without weights_only=True"),
    ("import numpy\nnumpy.load('x.npy', allow_pickle=True)", "numpy.load(allow_pickle=True)"),
    ("from numpy import load\nload('x.npy', allow_pickle=True)", "numpy.load(allow_pickle=True)"),
    ("import numpy as np\nnp.load('x.npz', allow_pickle=trusted)", "numpy.load(allow_pickle=trusted)"),
    ("import pandas as pd\npd.read_pickle('x.pkl')", "pandas.read_pickle unpickles"),
    ("from subprocess import run\nrun('ls', shell=True)", "shell command string"),
])
def test_the_checker_catches_each_rule(snippet, found):
    assert any(found in v for v in violations(snippet))


def test_the_checker_allows_the_safe_forms():
    safe = ("import torch, yaml, subprocess, numpy as np\ntorch.load('x', weights_only=True)\n"
            "yaml.load(open('f'), Loader=yaml.SafeLoader)\nsubprocess.run(['ls', '-l'])\nnp.load('x.npy')\n"
            "dist.all_gather_object(out, x)  # trusted peers: the ranks of this job\n"
            "np.load('x.npz', allow_pickle=False)\nimportlib.import_module(f'mip_core.adapters.{name}')\n"
            "from json import load\nload(f)\nfrom yaml import SafeLoader\nyaml.load(f, Loader=SafeLoader)\n")
    assert violations(safe) == []
