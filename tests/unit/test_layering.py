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
             "mip_core.service.shards, mip_core.entrypoints.edit, mip_core._compat.deepspeed")
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
