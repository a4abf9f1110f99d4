"""Prefect layer: thin over mip_core (see the package docstrings).

Ray reads its authentication settings once, when it is imported, so they are settled here, before any task module
imports Ray. A local cluster (no ``RAY_ADDRESS``: the demo, a single worker host) gets token auth with a random
per-process token in the environment, which Ray's own processes inherit: Ray's default would write the token to
``~/.ray/auth_token`` and warn about it on every batch. An operator's ``RAY_AUTH_MODE`` / ``RAY_AUTH_TOKEN``, and
any cluster named by ``RAY_ADDRESS``, are left as configured.
"""

import os
import secrets
import sys

if "ray" not in sys.modules and "RAY_ADDRESS" not in os.environ and "RAY_AUTH_MODE" not in os.environ:
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
