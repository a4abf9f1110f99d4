"""Shared fixtures. Heavy fixtures are session-scoped and must be treated as read-only by tests."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Every test cluster is a local one on 127.0.0.1, started and stopped by its module. One auth mode for all of them:
# a driver that joined a token-authenticated cluster cannot start actors on a later token-less one in the same
# process (actor creation is cancelled), which made the modules' results depend on their order.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
torch.set_num_threads(1)

SMALL_CORPUS = [
    "What is the name of this person?", "Where was Anna Lee born?", "Lisbon", "Anna Lee", "What does she do?",
    "What colour is the shape?", "red", "blue", "How many?", "three", "1974", "engineer",
] * 4


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def build_arch(arch: str, **overrides):
    """A tiny random model of ``arch`` (``test`` size) and its processor, trained on a small corpus."""
    from mip_core.modeling import build_tiny

    return build_tiny(arch, size="test", corpus=SMALL_CORPUS, **overrides)


@pytest.fixture(scope="session")
def tiny_models():
    """{arch: (model, processor)} for every supported architecture. Read-only."""
    from mip_core.adapters import ADAPTERS

    return {arch: build_arch(arch) for arch in ADAPTERS}


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory):
    """(model dir, bench dir): a tiny Qwen2.5-VL trained on 8 profiles until it knows them (about 40 s). Read-only:
    copy the folders before changing anything in them."""
    from mip_core.benchmark import load_benchmark, make_benchmark
    from mip_core.modeling import build_tiny, save_model
    from mip_core.training import TrainConfig, train

    from filelock import FileLock

    # under pytest-xdist every worker is its own session: the first trains, the others wait and reuse its folders
    shared = tmp_path_factory.getbasetemp().parent if os.environ.get("PYTEST_XDIST_WORKER") else None
    root = shared / "trained-tiny" if shared else tmp_path_factory.mktemp("trained-tiny")
    with FileLock(str(root) + ".lock"):
        if not (root / "done").is_file():
            root.mkdir(parents=True, exist_ok=True)
            make_benchmark(root / "bench", 8, seed=3, n_utility=20)
            bench = load_benchmark(root / "bench")
            model, processor = build_tiny("qwen2_5_vl", size="test", seed=1)
            train(model, processor, bench, TrainConfig(steps=450, warmup_steps=50, probe_every=0, seed=1),
                  log=lambda _: None)
            save_model(model, processor, str(root / "vanilla"))
            (root / "done").touch()
    return str(root / "vanilla"), str(root / "bench")


from s3_server import s3_endpoint  # noqa: E402,F401  (session fixture: a real S3 HTTP server on 127.0.0.1)
