"""Render a vanilla model's learning curve (``training_log.json`` written by ``mip vanilla``) as Markdown.

Usage: python benches/training_curve.py demo_out/vanilla/training_log.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def render(log: dict) -> str:
    cfg = log["config"]
    lines = [
        f"arch `{log.get('arch')}`, size `{log.get('size')}`, {log['n_examples']} training examples, "
        f"batch {cfg['batch_size']}, AdamW lr {cfg['lr']}, identity warm-up {cfg.get('identity_warmup_steps', 0)} "
        f"steps; {log['steps_done']} steps in {log['seconds']:.0f} s",
        "",
        "| step | seconds | train loss | multimodal exact | text exact |",
        "|---:|---:|---:|---:|---:|",
    ]
    for p in log["curve"]:
        lines.append(f"| {p['step']} | {p['seconds']:.0f} | {p['train_loss']:.3f} | "
                     f"{p.get('multimodal_exact', float('nan')):.3f} | {p.get('text_exact', float('nan')):.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(json.loads(Path(sys.argv[1]).read_text())))
