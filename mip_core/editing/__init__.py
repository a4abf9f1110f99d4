"""Unlearning edits: path-restricted prune + RMisU (MIP-Editor), its controls, and the baselines.

Import the heavy pieces from their modules (``mip_core.editing.methods``, ``.slices``, ``.rmisu``); this package
module stays light so that the CLI can list the method names without importing torch.
"""

#: Registered method names, in the order ``mip compare --methods all`` runs them (checked against the registry).
METHOD_NAMES = ("mip", "mip_paper", "random", "rmu", "prune", "mip_text", "mip_vision", "manu", "ga", "ga_diff",
                "kl_min", "npo")

__all__ = ["METHOD_NAMES"]
