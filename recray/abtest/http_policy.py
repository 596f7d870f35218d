"""An arm ranked by a `recray serve` endpoint: one POST /v1/rank per session, naming the variant."""

from __future__ import annotations

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from recray.abtest.config import HttpArm
from recray.simulators.policies import ModelPolicy


def _get(url: str, timeout_s: float) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return json.loads(response.read())


class HttpPolicy(ModelPolicy):
    """The same (user, candidate) rows a `ModelPolicy` builds (ids folded into the served model's
    vocabulary, the user's history from this policy's own logged clicks), sent as JSON.

    The variant's schema is read from the run folder `/v1/models` names: the rows must match the
    endpoint's columns exactly (the request model forbids unknown fields).
    """

    def __init__(self, slate_size: int, arm: HttpArm) -> None:
        from recray.data.schema import Schema

        self.arm, self.base = arm, arm.url.rstrip("/")
        models = _get(f"{self.base}/v1/models", arm.timeout_s)
        variant = next(v for v in models["variants"] if v["name"] == arm.variant)
        schema = Schema.load(Path(variant["run_dir"]) / "schema.yaml")
        spec = _get(f"{self.base}/openapi.json", arm.timeout_s)["components"]["schemas"]
        self.user_fields = list(spec["User"]["properties"])
        self.candidate_fields = list(spec["Candidate"]["properties"])
        super().__init__(slate_size, schema, model=_NoModel(), label=schema.labels[0])
        self.scored, self.seconds = 0, 0.0  # candidates scored through the endpoint, wall time

    def _request(self, body: bytes) -> list[int]:
        request = urllib.request.Request(f"{self.base}/v1/rank", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=self.arm.timeout_s) as response:
            return json.loads(response.read())["ranking"]

    def scores(self, obs: dict, rng: Any, info: dict | None) -> np.ndarray:
        """Score = minus the position in the endpoint's ranking (raises on any failed request)."""
        users, candidates = obs["item_id"].shape
        table = self.rows(obs)
        columns = {name: table.column(name).to_pylist()
                   for name in self.user_fields + self.candidate_fields}
        bodies = []
        for u in range(users):
            at = u * candidates
            bodies.append(json.dumps({
                "variant": self.arm.variant,
                "user": {name: columns[name][at] for name in self.user_fields},
                "candidates": [{name: columns[name][at + c] for name in self.candidate_fields}
                               for c in range(candidates)],
            }).encode())
        started = time.perf_counter()
        with ThreadPoolExecutor(self.arm.concurrency) as pool:
            rankings = list(pool.map(self._request, bodies))
        self.seconds += time.perf_counter() - started
        self.scored += users * candidates
        scores = np.zeros((users, candidates))
        for u, ranking in enumerate(rankings):
            scores[u, ranking] = -np.arange(len(ranking), dtype=float)
        return scores


class _NoModel:
    """ModelPolicy wants a model for `eval()`; the endpoint holds the real one."""

    def eval(self) -> _NoModel:
        return self
