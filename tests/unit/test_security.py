"""Source checks for the service's security rules: no unpickling, no shell strings, no eval.

Models and path graphs come from storage other people can write to, so nothing the project reads may run code
when loaded: weights are safetensors, tables Parquet, records JSON. These checks read the source (AST), so a new
``pickle.load`` or ``torch.load`` without ``weights_only=True`` fails CI wherever it is added.
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


def violations(source: str, filename: str = "<src>") -> list[str]:
    out: list[str] = []
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            if any(n and n.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve")
                   for n in names):
                out.append(f"{filename}:{node.lineno}: imports a pickle-based serializer")
        if not isinstance(node, ast.Call):
            continue
        name = _name(node.func)
        where = f"{filename}:{node.lineno}"
        if name == "torch.load" and not _is_true(_keyword(node, "weights_only")):
            out.append(f"{where}: torch.load without weights_only=True")
        if name.split(".")[-1] == "load" and name.split(".")[0] in ("np", "numpy") and _is_true(
                _keyword(node, "allow_pickle")):
            out.append(f"{where}: numpy.load(allow_pickle=True)")
        loader = _keyword(node, "Loader")
        if name in ("yaml.load", "yaml.unsafe_load") and (loader is None or _name(loader) not in (
                "yaml.SafeLoader", "SafeLoader", "yaml.CSafeLoader")):
            out.append(f"{where}: yaml.load without SafeLoader")
        if name.split(".")[-1] in OBJECT_COLLECTIVES and TRUSTED_PEERS not in lines[node.lineno - 1]:
            out.append(f"{where}: {name.split('.')[-1]} pickles across ranks; only between the ranks of one job, "
                       f"marked `{TRUSTED_PEERS} <why>` on the line")
        if name in ("eval", "exec"):
            out.append(f"{where}: {name}()")
        if name.split(".")[0] == "subprocess" or name in ("os.system", "os.popen"):
            if name in ("os.system", "os.popen") or _is_true(_keyword(node, "shell")):
                out.append(f"{where}: a shell command string ({name})")
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
])
def test_the_checker_catches_each_rule(snippet, found):
    assert any(found in v for v in violations(snippet))


def test_the_checker_allows_the_safe_forms():
    safe = ("import torch, yaml, subprocess, numpy as np\ntorch.load('x', weights_only=True)\n"
            "yaml.load(open('f'), Loader=yaml.SafeLoader)\nsubprocess.run(['ls', '-l'])\nnp.load('x.npy')\n"
            "dist.all_gather_object(out, x)  # trusted peers: the ranks of this job\n")
    assert violations(safe) == []
