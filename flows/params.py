"""Flow parameters as pydantic models: Prefect renders them as a UI form and validates deployment values."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mip_core.training import TrainConfig


class VanillaSpec(BaseModel):
    """What to build for a vanilla run: benchmark, tiny model, training budget and the evaluation split."""

    # A misspelt key in a deployment's parameters must fail the run, not be silently ignored.
    model_config = ConfigDict(extra="forbid")

    workdir: str = Field(description="Folder for every artifact: bench/, vanilla/ and vanilla_eval.json. "
                                     "Relative paths resolve against the worker's working directory.")
    profiles: int = Field(100, ge=4, description="Number of fictitious people in the synthetic benchmark.")
    seed: int = Field(0, ge=0, description="Seed of the benchmark, the model's initial weights and training.")
    arch: Literal["qwen2_5_vl", "qwen2_vl", "llava"] = Field(
        "qwen2_5_vl", description="Architecture of the tiny random model that is fine-tuned.")
    size: Literal["demo", "test"] = Field(
        "demo", description="Tiny model size: 'demo' memorises 100 profiles; 'test' is for CI-sized runs.")
    steps: int = Field(7000, ge=1, description="Maximum optimiser steps (`minutes` may stop earlier).")
    minutes: float = Field(15, gt=0, description="Wall-clock budget for the training loop, in minutes.")
    forget_pct: Literal[5, 10, 15] = Field(
        10, description="Forget split to report, in % of profiles (the other profiles are the retain split).")
    reuse: bool = Field(True, description="Keep a matching benchmark and a trained model already in "
                                          "`workdir` instead of rebuilding them; off forces a rebuild.")

    def train_config(self) -> TrainConfig:
        """The library's training schedule for this spec; threads come from the worker (``$MIP_THREADS``)."""
        return TrainConfig(steps=self.steps, max_minutes=self.minutes, seed=self.seed,
                           threads=int(os.environ.get("MIP_THREADS", "1")))
