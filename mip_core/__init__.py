"""mip_core: the pure ML library of MIP-Editor (no Prefect, no Ray).

Adapters map supported multimodal architectures onto canonical MLP sites; ``modeling`` builds, loads and saves
models; ``benchmark`` generates the synthetic forget benchmark; ``training`` makes the vanilla model;
``evaluation`` measures forgetting and retention.
"""

__version__ = "0.1.0"
