"""Compare unlearning methods from one vanilla model, on the same forget subsets, in one run.

For each forget seed (seed 0 = the benchmark's own forget split, seed ``s`` = another subset of the same size,
see ``Benchmark.with_forget_seed``): evaluate the vanilla model, attribute the forget items once (the same path
graph serves every path-based method), then for every method restore the vanilla weights, unlearn, evaluate
against the vanilla rows and measure the membership-inference AUC. Rows are tidy (``mip eval --json`` rows plus
``method`` and ``seed``); :func:`summarize` gives mean and standard deviation over seeds.

With gold models (``CompareConfig.gold``: one per seed, trained by the same recipe without that seed's forget
people, ``mip vanilla --exclude-forget``), every method is also measured against exact unlearning: each
accuracy minus the gold model's on the same items, and MUSE's privacy leak ``(AUC - AUC_gold) / AUC_gold`` of
the membership attack. Forgetting more than the gold model (accuracy below it) is as visible as forgetting less.

Selectivity (the number methods are ranked by) is the harmonic mean of the MC forgetting rate on the forget
split and the MC retention on the retain split, per modality: a method must do both to score.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mip_core.attribution import AttributionConfig
from mip_core.benchmark import Benchmark
from mip_core.benchmark.holdout import holdout_items
from mip_core.config import Count, config_class
from mip_core.editing import METHOD_NAMES, MethodName
from mip_core.editing.data import unlearn_data
from mip_core.editing.methods import METHODS, get_method
from mip_core.editing.rmisu import RMisUConfig
from mip_core.editing.unlearn import forget_graph
from mip_core.evaluation import evaluate
from mip_core.evaluation.mia import mia_auc
from mip_core.evaluation.runner import SPLITS, EvalRow
from mip_core.errors import InputError
from mip_core.modeling.io import LoadedModel, cache_dir, load_model
from mip_core.training import encode_items, read_training_log
from mip_core.types import MODALITIES

COMPARE_SCHEMA = "mip-compare/1"
#: The order methods are run and printed in; ``all`` expands to this.
DEFAULT_METHODS = METHOD_NAMES


@config_class
class CompareConfig:
    """One ``mip compare`` run; a bad value (an unknown method, ``seeds=0``) raises InputError naming the field."""

    forget_pct: int = 5
    methods: tuple[MethodName, ...] = DEFAULT_METHODS
    seeds: Count = 1  # forget subsets: 0 .. seeds-1
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    rmisu: RMisUConfig | None = None  # None: each method's default
    edit: dict[str, Any] = field(default_factory=dict)  # EditConfig overrides (prune, train_rows, ...)
    holdout_profiles: int = 10  # never-seen people for the membership-inference AUC
    batch_size: int = 64
    gold: tuple[str, ...] = ()  # gold model per forget seed (0 .. seeds-1), or none


@dataclass(frozen=True, slots=True)
class CompareRow:
    """One tidy row: an :class:`EvalRow` of one method on one forget seed."""

    method: str
    seed: int
    split: str
    modality: str
    task: str
    metric: str
    value: float
    n: int

    def __post_init__(self) -> None:
        # one numeric type for every row: metrics arrive as numpy or Python floats, and `statistics` rejects a mix
        object.__setattr__(self, "value", float(self.value))

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "seed": self.seed, "split": self.split, "modality": self.modality,
                "task": self.task, "metric": self.metric, "value": self.value, "n": self.n}


def harmonic_mean(a: float, b: float) -> float:
    """Harmonic mean of two rates, each clipped to [0, 1] (a negative forgetting rate counts as 0)."""
    a, b = min(max(a, 0.0), 1.0), min(max(b, 0.0), 1.0)
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def selectivity_rows(rows: Sequence[EvalRow]) -> list[EvalRow]:
    """Per modality: ``split="overall", metric="hm"``, the HM of MC forgetting rate and MC retention."""
    idx = {(r.split, r.modality, r.task, r.metric): r for r in rows}
    out = []
    for modality in MODALITIES:
        fr = idx.get(("forget", modality, "mc", "forgetting_rate"))
        ret = idx.get(("retain", modality, "mc", "retention"))
        if fr and ret:
            out.append(EvalRow("overall", modality, "mc", "hm", harmonic_mean(fr.value, ret.value), fr.n))
    return out


def compare(loaded: LoadedModel, bench: Benchmark, cfg: CompareConfig, *, log: Callable[[str], None] = print,
            holdout_root: str | Path | None = None) -> list[CompareRow]:
    """Run every method of ``cfg`` on every forget seed from ``loaded``'s weights; returns tidy rows.

    ``loaded.model`` is modified during the run and holds the vanilla weights again at the end.
    """
    if cfg.gold and len(cfg.gold) != cfg.seeds:
        raise InputError(f"CompareConfig.gold has {len(cfg.gold)} models for {cfg.seeds} forget subsets; give one "
                         "gold model per subset (mip vanilla --exclude-forget PCT --forget-seed SEED), or none")
    model, processor, adapter = loaded.model, loaded.processor, loaded.adapter
    vanilla = copy.deepcopy(model.state_dict())
    holdout_bench, holdout = holdout_items(bench, cfg.holdout_profiles, holdout_root or cache_dir())
    non_members = {m: encode_items(processor, holdout_bench, [it for it in holdout if it.modality == m])
                   for m in MODALITIES}
    rows: list[CompareRow] = []
    try:
        for seed in range(cfg.seeds):
            model.load_state_dict(vanilla)  # the previous seed's last method edited it
            b = bench.with_forget_seed(seed)
            forget = b.split_items("forget", forget_pct=cfg.forget_pct)
            retain = b.split_items("retain", forget_pct=cfg.forget_pct)
            data = unlearn_data(processor, b, forget, retain)
            members = {m: [ex for ex, mod in zip(data.forget, data.forget_modality, strict=True) if mod == m]
                       for m in MODALITIES}
            log(f"seed {seed}: forgetting {len(b.forget_profile_ids(cfg.forget_pct))} profiles "
                f"({len(forget)} items), retaining {len(retain)} items")

            evaluated = _measure(loaded, b, cfg, members, non_members, None, log=log, label="vanilla")
            reference = [r for r in evaluated if r.metric in ("accuracy", "rougeL")]
            gold = _gold_rows(cfg, seed, b, members, non_members, reference, log=log) if cfg.gold else []
            rows.extend(_tag("gold", seed, gold))
            rows.extend(_tag("vanilla", seed, evaluated + gold_distance(evaluated, gold)))
            graph = None
            if any(METHODS[m].needs_graph or getattr(METHODS[m], "uses_graph", False) for m in cfg.methods):
                t0 = time.perf_counter()
                graph = forget_graph(loaded, b, forget_pct=cfg.forget_pct, cfg=cfg.attribution,
                                     run_id=f"compare-seed{seed}")
                log(f"  attributed {len(forget)} items in {time.perf_counter() - t0:.0f}s: {len(graph)} path neurons")
            for name in cfg.methods:
                model.load_state_dict(vanilla)
                method = get_method(name, rmisu=cfg.rmisu, edit_overrides=cfg.edit, seed=seed)
                summary = method.run(model, adapter, data, graph=graph, log=lambda _line: None)
                log(f"  {name:10s} edited {summary.trainable_parameters} parameters in {summary.seconds:.0f}s")
                edited = _measure(loaded, b, cfg, members, non_members, reference, log=log, label=name)
                rows.extend(_tag(name, seed, edited + gold_distance(edited, gold)))
    finally:
        model.load_state_dict(vanilla)
    return rows


def _gold_rows(cfg: CompareConfig, seed: int, bench: Benchmark, members: dict[str, list],
               non_members: dict[str, list], reference: Sequence[EvalRow], *, log: Callable[[str], None]
               ) -> list[EvalRow]:
    """The gold model of ``seed`` measured like every method (after checking it never saw that seed's people)."""
    uri = cfg.gold[seed]
    check_gold(uri, bench.forget_profile_ids(cfg.forget_pct), f"CompareConfig.gold[{seed}]",
               f"--exclude-forget {cfg.forget_pct} --forget-seed {seed}")
    return _measure(load_model(uri), bench, cfg, members, non_members, reference, log=log, label="gold")


def check_gold(uri: str, forget_ids: frozenset[str], field_name: str, flags: str) -> None:
    """Refuse a gold model not trained without exactly ``forget_ids``: its distances would mean nothing."""
    log = read_training_log(uri)  # the log alone: no need to fetch a remote model's weights for this
    excluded = set((log or {}).get("config", {}).get("exclude_profiles") or ())
    if excluded != set(forget_ids):
        raise InputError(f"{field_name}={uri} was trained without {len(excluded)} people "
                         f"({sorted(excluded)[:3]}...), not the {len(forget_ids)} this forget subset forgets "
                         f"({sorted(forget_ids)[:3]}...); train it with `mip vanilla ... {flags}`")


#: Metrics measured against the gold model: (split, task, metric) -> the distance's metric name.
GOLD_METRICS = {(split, "mc", "accuracy"): "accuracy_minus_gold" for split in SPLITS} | {
    (split, "gen", "rougeL"): "rougeL_minus_gold" for split in SPLITS}


def gold_distance(rows: Sequence[EvalRow], gold: Sequence[EvalRow]) -> list[EvalRow]:
    """``rows``' distance to the gold model's rows on the same items: accuracy and ROUGE-L minus the gold's
    (0 is exact unlearning; below 0 on the forget split is forgetting more than a model that never saw them),
    and the privacy leak ``(AUC - AUC_gold) / AUC_gold`` of the membership attack (MUSE's PrivLeak)."""
    ref = {(r.split, r.modality, r.task, r.metric): r.value for r in gold}
    out = []
    for r in rows:
        base = ref.get((r.split, r.modality, r.task, r.metric))
        if base is None:
            continue
        if (r.split, r.task, r.metric) in GOLD_METRICS:
            out.append(EvalRow(r.split, r.modality, r.task, GOLD_METRICS[(r.split, r.task, r.metric)],
                               r.value - base, r.n))
        elif r.metric == "mia_auc" and base > 0:
            out.append(EvalRow(r.split, r.modality, "mia", "privacy_leak", (r.value - base) / base, r.n))
    return out


def _tag(method: str, seed: int, rows: Sequence[EvalRow]) -> list[CompareRow]:
    return [CompareRow(method, seed, r.split, r.modality, r.task, r.metric, r.value, r.n) for r in rows]


def _measure(loaded: LoadedModel, bench: Benchmark, cfg: CompareConfig, members: dict[str, list],
             non_members: dict[str, list], reference: Sequence[EvalRow] | None, *, log: Callable[[str], None],
             label: str) -> list[EvalRow]:
    """Evaluate every split, add HM and the membership-inference AUC per modality."""
    t0 = time.perf_counter()
    pad = int(loaded.processor.tokenizer.pad_token_id)
    evaluated = evaluate(loaded.model, loaded.processor, bench, forget_pct=cfg.forget_pct, splits=SPLITS,
                         reference=reference, batch_size=cfg.batch_size)
    evaluated += selectivity_rows(evaluated)
    for m in MODALITIES:
        if members[m] and non_members[m]:
            evaluated.append(EvalRow("forget", m, "mia", "mia_auc",
                                     mia_auc(loaded.model, members[m], non_members[m], pad, cfg.batch_size),
                                     len(members[m])))
    log(f"  {label:10s} evaluated in {time.perf_counter() - t0:.0f}s  " + _headline(evaluated))
    return evaluated


def _headline(rows: Sequence[EvalRow]) -> str:
    idx = {(r.split, r.modality, r.task, r.metric): r.value for r in rows}
    parts = []
    for m in MODALITIES:
        f, r = idx.get(("forget", m, "mc", "accuracy")), idx.get(("retain", m, "mc", "accuracy"))
        hm = idx.get(("overall", m, "mc", "hm"))
        parts.append(f"{m[:4]}: forget {f:.3f} retain {r:.3f}" + (f" hm {hm:.3f}" if hm is not None else ""))
    return " | ".join(parts)


@dataclass(frozen=True, slots=True)
class SummaryRow:
    method: str
    split: str
    modality: str
    task: str
    metric: str
    mean: float
    std: float  # sample standard deviation over seeds (0 for one seed)
    n_seeds: int

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "split": self.split, "modality": self.modality, "task": self.task,
                "metric": self.metric, "mean": self.mean, "std": self.std, "n_seeds": self.n_seeds}


def summarize(rows: Sequence[CompareRow]) -> list[SummaryRow]:
    """Mean and standard deviation over seeds of every (method, split, modality, task, metric)."""
    groups: dict[tuple[str, str, str, str, str], list[float]] = {}
    for r in rows:
        groups.setdefault((r.method, r.split, r.modality, r.task, r.metric), []).append(r.value)
    return [SummaryRow(*key, statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
            for key, v in groups.items()]


def paired_differences(rows: Sequence[CompareRow], a: str, b: str, *, metric: str = "hm"
                       ) -> dict[str, list[float]]:
    """Per modality, ``value(a) - value(b)`` of ``overall/<metric>`` on each seed (the paired comparison)."""
    idx = {(r.method, r.seed, r.modality): r.value for r in rows if r.split == "overall" and r.metric == metric}
    seeds = sorted({r.seed for r in rows})
    return {m: [idx[(a, s, m)] - idx[(b, s, m)] for s in seeds if (a, s, m) in idx and (b, s, m) in idx]
            for m in MODALITIES}


@dataclass(frozen=True, slots=True)
class PairedComparison:
    """HM(a) - HM(b) on the same forget subsets, and whether ``a`` is ahead beyond the seed-to-seed spread.

    ``beyond_spread``: ahead on every subset *and* by more, on average, than the larger of the two methods' own
    standard deviations over subsets. A lead inside the spread of either method is not counted as a win: with few
    subsets, it would not reliably keep its sign on the next one.
    """

    a: str
    b: str
    modality: str
    diffs: tuple[float, ...]
    mean: float
    std: float  # of the paired differences
    spread: float  # max(std over subsets of HM(a), of HM(b))
    wins: int

    @property
    def beyond_spread(self) -> bool:
        return len(self.diffs) > 1 and self.wins == len(self.diffs) and self.mean > self.spread

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "modality": self.modality, "diffs": list(self.diffs), "mean": self.mean,
                "std": self.std, "spread": self.spread, "wins": self.wins, "beyond_spread": self.beyond_spread}


def paired_comparison(rows: Sequence[CompareRow], a: str, b: str, *, metric: str = "hm") -> list[PairedComparison]:
    """Per modality, the paired comparison of ``a`` against ``b`` (see :class:`PairedComparison`)."""
    out = []
    for modality, diffs in paired_differences(rows, a, b, metric=metric).items():
        if not diffs:
            continue
        per_method = {m: [r.value for r in rows if r.method == m and r.modality == modality
                          and r.split == "overall" and r.metric == metric] for m in (a, b)}
        spread = max(statistics.stdev(v) if len(v) > 1 else 0.0 for v in per_method.values())
        out.append(PairedComparison(a, b, modality, tuple(diffs), statistics.fmean(diffs),
                                    statistics.stdev(diffs) if len(diffs) > 1 else 0.0, spread,
                                    sum(d > 0 for d in diffs)))
    return out


def format_paired(rows: Sequence[CompareRow], a: str = "mip", others: Sequence[str] = ("random", "rmu")) -> str:
    """Lines ``HM(a) - HM(b)`` per modality for each of ``others`` present in ``rows`` ('' if none is)."""
    methods = {r.method for r in rows}
    lines = []
    for b in others:
        if a not in methods or b not in methods:
            continue
        for c in paired_comparison(rows, a, b):
            verdict = "ahead beyond the spread" if c.beyond_spread else (
                "ahead, within the spread" if c.mean > 0 else "not ahead")
            lines.append(f"HM({a}) - HM({b}) {c.modality:10s} per subset "
                         + ", ".join(f"{d:+.3f}" for d in c.diffs)
                         + f"  mean {c.mean:+.3f} (spread {c.spread:.3f}), ahead on {c.wins}/{len(c.diffs)}: {verdict}")
    return "\n".join(lines) + ("\n" if lines else "")


#: (header, split, task, metric) of the printed table, per modality.
TABLE_COLUMNS = (
    ("forget", "forget", "mc", "accuracy"), ("retain", "retain", "mc", "accuracy"),
    ("test", "test", "mc", "accuracy"), ("utility", "utility", "mc", "accuracy"),
    ("F-rougeL", "forget", "gen", "rougeL"), ("R-rougeL", "retain", "gen", "rougeL"),
    ("forget%", "forget", "mc", "forgetting_rate"), ("retain%", "retain", "mc", "retention"),
    ("util%", "utility", "mc", "retention"), ("MIA", "forget", "mia", "mia_auc"), ("HM", "overall", "mc", "hm"),
)


#: The distance-to-gold table, printed when the run had gold models.
GOLD_COLUMNS = (
    ("forget", "forget", "mc", "accuracy_minus_gold"), ("test", "test", "mc", "accuracy_minus_gold"),
    ("retain", "retain", "mc", "accuracy_minus_gold"), ("utility", "utility", "mc", "accuracy_minus_gold"),
    ("R-rougeL", "retain", "gen", "rougeL_minus_gold"), ("privLeak", "forget", "mia", "privacy_leak"),
)


def format_compare(summary: Sequence[SummaryRow]) -> str:
    """One table per modality: a row per method, mean (and +-std over seeds when there are several); then the
    distance to the gold models when the run had them."""
    text = _tables(summary, TABLE_COLUMNS, "MC accuracy, ROUGE-L, rates vs vanilla")
    if any(s.metric.endswith("_minus_gold") for s in summary):
        text += "\n" + _tables([s for s in summary if s.method != "gold"], GOLD_COLUMNS,
                               "minus the gold model (never saw the forget people): 0 is exact unlearning")
    return text


def _tables(summary: Sequence[SummaryRow], columns: Sequence[tuple[str, str, str, str]], title: str) -> str:
    idx = {(s.method, s.split, s.modality, s.task, s.metric): s for s in summary}
    methods = list(dict.fromkeys(s.method for s in summary))
    n_seeds = max((s.n_seeds for s in summary), default=1)
    width = 14 if n_seeds > 1 else 9
    lines = []
    for modality in MODALITIES:
        lines.append(f"{modality} ({title}; mean"
                     f"{' +- std over ' + str(n_seeds) + ' forget subsets' if n_seeds > 1 else ''})")
        lines.append(f"{'method':11s}" + "".join(f"{h:>{width}s}" for h, *_ in columns))
        for method in methods:
            cells = []
            for _, split, task, metric in columns:
                s = idx.get((method, split, modality, task, metric))
                if s is None:
                    cells.append(f"{'-':>{width}s}")
                elif n_seeds > 1:
                    cells.append(f"{s.mean:>7.3f}+-{s.std:.3f}"[-width:].rjust(width))
                else:
                    cells.append(f"{s.mean:>{width}.3f}")
            lines.append(f"{method:11s}" + "".join(cells))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def to_json(rows: Sequence[CompareRow], cfg: CompareConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    summary = summarize(rows)
    return {"schema": COMPARE_SCHEMA, "config": _config_dict(cfg), **(extra or {}),
            "rows": [r.to_dict() for r in rows], "summary": [s.to_dict() for s in summary]}


def _config_dict(cfg: CompareConfig) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(cfg)


def plot(summary: Sequence[SummaryRow], out: str | Path) -> None:
    """Forgetting rate vs retention (MC) per method, one panel per modality, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = {(s.method, s.split, s.modality, s.metric): s for s in summary if s.task == "mc"}
    methods = [m for m in dict.fromkeys(s.method for s in summary) if m != "vanilla"]
    fig, axes = plt.subplots(1, len(MODALITIES), figsize=(11, 4.8), sharey=True)
    cmap = plt.get_cmap("tab20")
    for ax, modality in zip(axes, MODALITIES, strict=True):
        for k, method in enumerate(methods):
            fr = idx.get((method, "forget", modality, "forgetting_rate"))
            ret = idx.get((method, "retain", modality, "retention"))
            if fr is None or ret is None:
                continue
            ax.errorbar(fr.mean, ret.mean, xerr=fr.std or None, yerr=ret.std or None, fmt="o", ms=7,
                        color=cmap(k), capsize=3, label=method)
            ax.annotate(method, (fr.mean, ret.mean), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.axvline(0.9, color="grey", lw=0.8, ls="--")
        ax.axhline(0.9, color="grey", lw=0.8, ls="--")
        ax.set_title(f"{modality}")
        ax.set_xlabel("forgetting rate (forget MC)")
        ax.set_xlim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("retention (retain MC)")
    axes[-1].legend(loc="lower left", fontsize=8, ncol=2)
    fig.suptitle("Forgetting vs retention per method (top right is best)")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


__all__ = [
    "COMPARE_SCHEMA",
    "DEFAULT_METHODS",
    "CompareConfig",
    "CompareRow",
    "PairedComparison",
    "SummaryRow",
    "compare",
    "format_compare",
    "format_paired",
    "harmonic_mean",
    "paired_comparison",
    "paired_differences",
    "plot",
    "selectivity_rows",
    "summarize",
    "to_json",
]
