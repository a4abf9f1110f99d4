"""The batch report: markdown an operator reads in the Prefect UI or in storage.

It carries ids, counts and metrics, never the questions, answers or images being forgotten.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mip_core.service.batch import BatchManifest


_SET_NAMES = {"test": "forget, held-out phrasings (not gated)", "earlier": "forgotten by earlier versions (rise)"}


def _f(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def unplanned_report(batch_id: str, target_model: str, records: Sequence[Any], reason: str) -> str:
    """Markdown for a batch that failed before it had a plan: which requests it held and why they failed."""
    lines = [f"# MIP-Editor batch `{batch_id}`", "", f"Model `{target_model}`: **failed before planning**: "
             f"{reason}", "", f"{len(records)} request(s); nothing was attributed, edited or published.", "",
             "## Requests", "", "| request | state | reason |", "|---|---|---|"]
    lines += [f"| `{rec.request.request_id}` | {rec.state} | {rec.reason or ''} |" for rec in records]
    return "\n".join(lines) + "\n"


def split_unedited_report(batch_id: str, target_model: str, records: Sequence[Any], why: str) -> str:
    """Markdown for a batch whose requests moved to one-request batches before it was planned, so a record's
    ``held_back_in`` entry for it leads to a report saying why and where each went."""
    lines = [f"# MIP-Editor batch `{batch_id}`", "", f"Model `{target_model}`: **not edited; each request moved to a "
             f"batch of its own**: {why}", "", "## Requests", "", "| request | state |", "|---|---|"]
    lines += [f"| `{rec.request.request_id}` | {request_state(rec, batch_id)} |" for rec in records]
    return "\n".join(lines) + "\n"


def request_state(record: Any, batch_id: str) -> str:
    """A request's state as this batch's report shows it: a request this batch's gate held back and that moved
    on to a smaller batch is "retried in `<batch>`", whatever that batch made of it since."""
    if batch_id in record.held_back_in:
        later = record.held_back_in[record.held_back_in.index(batch_id) + 1:] + [record.batch_id]
        return f"retried in `{later[0]}`"
    return record.state


def _generation_lines(generation: Sequence[Mapping[str, Any]]) -> list[str]:
    """The kept sets' generation table (none for a gate that did not measure it)."""
    if not generation:
        return []
    lines = ["", "Generation: mean ROUGE-L of the edited model's greedy answers against the starting model's (multiple "
                 "choice alone misses a model that no longer writes sensible answers)", "",
             "| set | modality | n | ROUGE-L |", "|---|---|---|---|"]
    return lines + [f"| {g['items']} | {g['modality']} | {g['n']} | {_f(g['rouge_l'])} |" for g in generation]


_BOTH = " (each against the starting and the registered model)"


def _registered_lines(since: Mapping[str, Any] | None) -> list[str]:
    """The kept sets against the registered model (none for a batch on the registered model itself)."""
    if not since:
        return []
    lines = ["", f"Since the registered model `{since['version']}` (what the lineage's edits lost together; the same "
                 "floors hold): accuracy of the registered model and the edited one, and ROUGE-L of the edited "
                 "model's answers against the registered model's", "",
             "| set | modality | n | registered | after | retention | ROUGE-L |", "|---|---|---|---|---|---|---|"]
    rouge = {(g["items"], g["modality"]): g["rouge_l"] for g in since.get("generation", [])}
    return lines + [f"| {s['items']} | {s['modality']} | {s['n']} | {_f(s['before'])} | {_f(s['after'])} | "
                    f"{_f(s['relative'])} | {_f(rouge.get((s['items'], s['modality']), '-'))} |"
                    for s in since["scores"]]


def _earlier_people_lines(people: Mapping[str, Mapping[str, float]] | None) -> list[str]:
    """Each person forgotten earlier on their items of the sample (none when there are none)."""
    if not people:
        return []
    lines = ["", "People forgotten earlier, one by one (by the request that forgot them): accuracy on their items of "
                 "the sample right after that edit and now, and how likely guessing scores now's accuracy or better",
             "", "| request | n | forgotten level | now | chance | rise | guessing |", "|---|---|---|---|---|---|---|"]
    return lines + [f"| `{rid}` | {int(f['n'])} | {_f(f['before'])} | {_f(f['after'])} | {_f(f['chance'])} | "
                    f"{_f(f['rise'])} | {_f(f['luck'])} |" for rid, f in people.items()]


def batch_report(m: BatchManifest, records: Sequence[Any], *, gate: Mapping[str, Any] | None, version: str | None,
                 error: str | None, timings: Mapping[str, float], shards: Sequence[Mapping[str, Any]] | None = None,
                 links: Mapping[str, str] | None = None) -> str:
    """Markdown: verdict, requests and outcomes, the gate's table, step timings, and links to the artifacts."""
    if version:
        verdict = f"**published** `{m.target_model}` `{version}` (from `{m.base_version}`)"
    elif error:
        verdict = f"**failed**: {error}"
    else:
        verdict = "**not published**: " + "; ".join((gate or {}).get("reasons", ["no gate decision"]))
    lines = [f"# MIP-Editor batch `{m.batch_id}`", "", f"Model `{m.target_model}`: {verdict}", "",
             f"{len(m.requests)} request(s), {len(m.rejected)} rejected at planning, {len(m.forget)} forget items, "
             f"{len(m.edit_retain)} items held during the edit; {len(m.eval_retain)} other people's and "
             f"{len(m.eval_utility)} general-knowledge items (held out) scored.", "", "## Requests", "",
             "| request | state | forget acc before | after | registered model's | held-out before | after "
             "| answer log p | reason |", "|---|---|---|---|---|---|---|---|---|"]
    per_request = (gate or {}).get("per_request", {})
    for rec in records:
        acc = per_request.get(rec.request.request_id, {})
        logp = (f"{acc['logprob_before']:.2f} -> {acc['logprob_after']:.2f}" if "logprob_after" in acc else "-")
        lines.append(f"| `{rec.request.request_id}` | {request_state(rec, m.batch_id)} | "
                     f"{_f(acc.get('before', '-'))} | "
                     f"{_f(acc.get('after', '-'))} | {_f(acc.get('registered_before', '-'))} | "
                     f"{_f(acc.get('test_before', '-'))} | "
                     f"{_f(acc.get('test_after', '-'))} | {logp} | {rec.reason or ''} |")
    if m.scores_dataset:
        lines += ["", "Probes asked about each person, the model's answers and which were kept: "
                      f"`batches/{m.batch_id}/probes.parquet`."]
    if gate:
        lines += ["", "## Evaluation (accuracy: multiple choice where an item has options, else greedy answer "
                      "match)", "",
                  "| set | modality | n | before | after | forgetting / retention |", "|---|---|---|---|---|---|"]
        for s in gate["scores"]:
            lines.append(f"| {_SET_NAMES.get(s['items'], s['items'])} | {s['modality']} | {s['n']} | "
                         f"{_f(s['before'])} | {_f(s['after'])} | {_f(s['relative'])} |")
        lines += _generation_lines(gate.get("generation", []))
        lines += _registered_lines(gate.get("registered"))
        lines += _earlier_people_lines(gate.get("earlier_people"))
        cfg = gate["config"]
        lines += ["", f"Gate: each request's own forgetting >= {cfg['min_forgetting']}; retention >= "
                      f"{cfg['min_retention']} and utility >= {cfg['min_utility']} per modality; generation "
                      f"(ROUGE-L) >= {cfg.get('min_generation', '-')}"
                      f"{_BOTH if cfg.get('against_registered') else ''}"
                      "; people forgotten "
                      f"earlier rise by <= {cfg.get('max_relapse', '-')}"
                      + (f" (each person too, unless guessing explains it: p >= {cfg['relapse_alpha']})"
                         if "relapse_alpha" in cfg else "") + ": "
                      f"**{'passed' if gate['passed'] else 'failed'}**"]
    if shards:
        failed = sum(len(s.get("failures", [])) for s in shards)
        actors = sorted({s.get("actor", "") for s in shards})
        lines += ["", f"Attribution: {len(shards)} shard(s) on {len(actors)} actor(s), "
                      f"{sum(s['n_paths'] for s in shards)} item path(s), {failed} item(s) failed."]
    if timings:
        lines += ["", "## Timings", "", "| step | seconds |", "|---|---|"]
        lines += [f"| {step} | {sec:.1f} |" for step, sec in timings.items()]
    if links:
        lines += ["", "## Artifacts", ""] + [f"- {name}: `{uri}`" for name, uri in links.items()]
    return "\n".join(lines) + "\n"


__all__ = ["batch_report"]
