"""Starting a local Ray, retried when a loaded host misses the raylet's fixed start-up window."""

from __future__ import annotations

import sys
from typing import Any

ATTEMPTS = 3


def init_local_ray(attempts: int = ATTEMPTS, **init_kwargs: Any):
    """`ray.init(address="local", **init_kwargs)`, retried on Ray's start-up timeout.

    Ray gives its raylet a fixed 30 s to register: on 2 busy cores (a test session, helpers,
    another Ray) it can miss that, and a second try then usually succeeds. Other errors are
    raised at once. Returns Ray's context.
    """
    import ray

    for attempt in range(attempts):
        try:
            return ray.init(address="local", **init_kwargs)
        except Exception as e:
            if "timed out during startup" not in str(e) or attempt == attempts - 1:
                raise
            ray.shutdown()
            print(f"ray.init timed out; attempt {attempt + 2} of {attempts}", file=sys.stderr)
    raise AssertionError("unreachable")
