"""Shared test fixtures: where ../shared/data is (tests that need it skip without it), a local Ray."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["TRITON_INTERPRET"] = "1"  # before any triton import: kernel tests run on CPU
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or skip: its files may not be committed into the project."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


# 6007 impressions split 8:1:1 leave 601 valid and 601 test rows: odd, so two workers cannot
# share them equally and a row-dropping split would show.
SMALL_WORLD_IMPRESSIONS = 6007


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory):
    """A small simulated world (parametric click model) for training and tuning tests."""
    from recray.data.simulate import WorldConfig, simulate

    out = tmp_path_factory.mktemp("sim")
    simulate(out, WorldConfig(num_users=300, num_items=200,
                              num_impressions=SMALL_WORLD_IMPRESSIONS, seed=3))
    return out


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """A real local Ray on this machine's 2 cores, shut down at the end of the session."""
    import ray

    from recray.platform.ray_init import init_local_ray

    init_local_ray(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=str(tmp_path_factory.mktemp("ray")),
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()
