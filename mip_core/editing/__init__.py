"""Unlearning edits: path-restricted prune + RMisU (MIP-Editor), its controls, and the baselines.

Import the heavy pieces from their modules (``mip_core.editing.methods``, ``.slices``, ``.rmisu``); this package
module stays light so that the CLI can list the method names without importing torch.
"""

from typing import Literal, get_args

#: A registered method name: a config field of this type refuses any other, naming the choices.
MethodName = Literal["mip", "mip_paper", "random", "rmu", "prune", "mip_text", "mip_vision", "manu", "ga", "ga_diff",
                     "kl_min", "npo"]
#: Registered method names, in the order ``mip compare --methods all`` runs them (checked against the registry).
METHOD_NAMES: tuple[str, ...] = get_args(MethodName)

__all__ = ["METHOD_NAMES", "MethodName"]
