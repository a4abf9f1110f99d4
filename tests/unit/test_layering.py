"""Guards on the architecture: the dependency direction and where model names may appear."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_mip_core_imports_without_prefect_or_ray():
    code = "import sys; sys.modules['prefect'] = None; sys.modules['ray'] = None; import mip_core, mip_core.cli"
    code += ("; import mip_core.service.store, mip_core.service.batch, mip_core.service.gate, "
             "mip_core.service.shards, mip_core.entrypoints.edit, mip_core.parallel.zero3_slices")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_no_model_names_outside_adapters():
    pattern = re.compile(r"qwen|llava|_name_or_path", re.IGNORECASE)
    offenders = [
        str(p.relative_to(ROOT)) for p in (ROOT / "mip_core").rglob("*.py")
        if "adapters" not in p.parts and pattern.search(p.read_text())
    ]
    assert offenders == []


def test_cli_help_on_every_command(capsys):
    import pytest

    from mip_core.cli import main

    commands = [["--help"], ["model", "--help"], ["model", "tiny", "--help"], ["benchmark", "--help"],
                ["benchmark", "make", "--help"], ["vanilla", "--help"], ["eval", "--help"],
                ["attribute", "--help"], ["paths", "--help"], ["paths", "reduce", "--help"], ["paths", "show", "--help"],
                ["submit", "--help"], ["requests", "--help"], ["models", "register", "--help"],
                ["models", "list", "--help"], ["report", "--help"], ["schema", "--help"], ["status", "--help"]]
    for argv in commands:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0, argv
        assert "usage: mip" in capsys.readouterr().out, argv
    # grouped top-level help, and examples in every command's help
    from mip_core.cli import COMMAND_GROUPS, EXAMPLES, build_parser

    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    for title, names in COMMAND_GROUPS:
        assert f"{title}:" in top and all(f"\n  {name} " in top for name in names), title
    assert top.index("submit") < top.index("benchmark")  # the service first

    def leaves(parser, path=""):
        sub = next((a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"), None)
        yield path, parser
        for name, child in (sub.choices.items() if sub else ()):
            yield from leaves(child, f"{path} {name}".strip())

    for path, parser in leaves(build_parser()):
        assert path in EXAMPLES, f"`mip {path} --help` has no examples"
        assert "examples:\n  mip " in parser.format_help(), path
    # the installed console script is the same entry point
    out = subprocess.run([str(Path(sys.executable).with_name("mip")), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage: mip" in out.stdout, out.stderr


def test_cli_help_imports_no_torch_and_the_light_names_match_their_sources():
    """`mip --help` must start fast (about 5 s when it imported torch and transformers): its parser is built
    from light name lists, which must equal the registries they stand for."""
    code = ("import sys; from mip_core.cli import build_parser; build_parser(); "
            "heavy = [m for m in ('torch', 'transformers', 'pydantic') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "[]"
    from mip_core.adapters import ADAPTERS, ARCHITECTURES, TINY_SIZE_NAMES, TINY_SIZES

    assert ARCHITECTURES == tuple(sorted(ADAPTERS)) and TINY_SIZE_NAMES == tuple(sorted(TINY_SIZES))


def _imports(path: Path, package_root: Path) -> set[str]:
    """Project modules ``path`` imports anywhere in it (top level, inside functions, under TYPE_CHECKING)."""
    import ast

    tree = ast.parse(path.read_text())
    parts = list(path.relative_to(package_root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    package = parts if path.name == "__init__.py" else parts[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


def test_no_import_cycles():
    """No module reaches itself through project imports, counting imports inside functions: a cycle hidden by a
    local import is still a cycle (Tarjan's strongly connected components over the module graph)."""
    modules = {}
    for top in ("mip_core", "tasks", "flows"):
        for path in (ROOT / top).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    graph = {name: sorted(m for m in _imports(path, ROOT) if m in modules and m != name)
             for name, path in modules.items()}
    # a package's __init__ re-exporting its submodules is not a cycle with them: drop package -> own child edges
    graph = {name: [m for m in deps if not (path.name == "__init__.py" and m.startswith(name + "."))]
             for (name, deps), path in zip(graph.items(), modules.values())}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in graph:
        if name not in index:
            visit(name)
    assert cycles == []
