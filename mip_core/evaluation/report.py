"""Readable and machine-readable forms of evaluation rows."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from mip_core.errors import InputError
from mip_core.evaluation.runner import SPLITS, EvalRow

REPORT_SCHEMA = "mip-eval/1"


def to_json(rows: Sequence[EvalRow]) -> dict[str, object]:
    return {"schema": REPORT_SCHEMA, "rows": [r.to_dict() for r in rows]}


def write_json(rows: Sequence[EvalRow], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(to_json(rows), indent=1) + "\n")


def read_json(path: str | Path) -> list[EvalRow]:
    """Read rows written by ``write_json`` (e.g. a vanilla model's evaluation used as ``--reference``)."""
    try:
        data = json.loads(Path(path).read_text())
        return [EvalRow(r["split"], r["modality"], r["task"], r["metric"], float(r["value"]), int(r["n"]))
                for r in data["rows"]]
    except FileNotFoundError:
        raise InputError(f"reference evaluation {path} does not exist; write one with `mip eval --json`") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"reference evaluation {path} is not a `mip eval --json` file ({exc!r})") from None


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return "nan" if math.isnan(value) else f"{value:.3f}"


def format_table(rows: Sequence[EvalRow]) -> str:
    """One line per split x modality: MC accuracy, ROUGE-L, and the relative figures when present."""
    cells = {(r.split, r.modality, r.task, r.metric): r for r in rows}
    keys = sorted({(r.split, r.modality) for r in rows}, key=lambda k: (SPLITS.index(k[0]), k[1]))
    relative = any(r.metric in ("forgetting_rate", "retention") for r in rows)
    header = f"{'split':8s} {'modality':10s} {'n':>5s} {'MC acc':>7s} {'ROUGE-L':>8s}"
    if relative:
        header += f" {'rel. metric':>16s} {'MC':>7s} {'ROUGE-L':>8s}"
    lines = [header, "-" * len(header)]
    for split, modality in keys:
        mc = cells.get((split, modality, "mc", "accuracy"))
        gen = cells.get((split, modality, "gen", "rougeL"))
        n = (mc or gen).n if (mc or gen) else 0
        line = f"{split:8s} {modality:10s} {n:5d} {_fmt(mc and mc.value):>7s} {_fmt(gen and gen.value):>8s}"
        if relative:
            for metric in ("forgetting_rate", "retention"):
                rel_mc = cells.get((split, modality, "mc", metric))
                rel_gen = cells.get((split, modality, "gen", metric))
                if rel_mc or rel_gen:
                    line += (f" {metric:>16s} {_fmt(rel_mc and rel_mc.value):>7s}"
                             f" {_fmt(rel_gen and rel_gen.value):>8s}")
        lines.append(line)
    return "\n".join(lines)
