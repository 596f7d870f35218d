"""Counter-based random streams: every draw is a pure hash of (user key, step, stream, index).

Why not one `np.random.Generator` per env: a vectorised env over N users would then need N
generators and a Python loop per step, or one shared generator whose draws for user i depend on
how many other users there are. Hashing instead makes user i's randomness a function of its own
key only, so user i of a vectorised env seeded with `s` is bit-identical to the scalar env seeded
with `s + i` (gymnasium's `SyncVectorEnv` convention), at numpy speed.

The mixer is splitmix64's finaliser (Steele et al. 2014), which passes BigCrush when fed a
Weyl sequence; each 64-bit hash yields two 32-bit uniforms.
"""

from __future__ import annotations

import numpy as np

_WEYL = np.uint64(0x9E3779B97F4A7C15)
_STEP = np.uint64(0xD1B54A32D192ED03)
_STREAM = np.uint64(0xAEF17502108EF2D9)
_EPISODE = np.uint64(0xF1357AEA2E62A9C5)
_SEED = np.uint64(0x8CB92BA72F3D8DD7)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_LOW32 = np.uint64(0xFFFFFFFF)
# Users are hashed in blocks so the intermediate uint64 arrays stay in cache (about 2x faster).
_BLOCK = 4096


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, in place on a uint64 array (wrap-around arithmetic is intended)."""
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


def keys_from_seeds(seeds: np.ndarray) -> np.ndarray:
    """One user key per integer seed (any int64 values, negative included)."""
    x = np.asarray(seeds, dtype=np.int64).astype(np.uint64) * _SEED + _WEYL
    return _mix(_mix(x))


def child_keys(parent: np.ndarray | int, indices: np.ndarray) -> np.ndarray:
    """Independent keys for numbered children (users, creators) of one parent key."""
    x = np.asarray(indices, dtype=np.int64).astype(np.uint64) * _SEED
    x += np.uint64(int(parent) % 2**64) if np.ndim(parent) == 0 else np.asarray(parent, np.uint64)
    return _mix(_mix(x ^ _EPISODE))


def next_episode_keys(keys: np.ndarray) -> np.ndarray:
    """The key of a user's next episode: a pure function of the last one, so autoresets replay."""
    return _mix(np.asarray(keys, dtype=np.uint64) + _EPISODE)


def uniforms(keys: np.ndarray, steps: np.ndarray, stream: int, count: int) -> np.ndarray:
    """`[N, count]` float64 uniforms in the open interval (0, 1), 32 random bits each.

    `keys` `[N]` uint64, `steps` `[N]` integers; `stream` separates independent uses within a step.
    """
    keys = np.asarray(keys, dtype=np.uint64)
    base = keys + np.asarray(steps, dtype=np.int64).astype(np.uint64) * _STEP
    base += np.uint64((stream * int(_STREAM)) % 2**64)
    pairs = (count + 1) // 2
    offsets = (np.arange(1, pairs + 1, dtype=np.uint64) * _WEYL)[None, :]
    out = np.empty((len(keys), 2 * pairs), dtype=np.float64)
    for start in range(0, len(keys), _BLOCK):
        stop = min(start + _BLOCK, len(keys))
        # The uint32 view splits each hash in two; uint32 -> float64 is ~30x faster than uint64.
        out[start:stop] = _mix(base[start:stop, None] + offsets).view(np.uint32)
    # +0.5 keeps both ends open, so log(u) is finite and floor(u * k) < k.
    out += 0.5
    out *= 2.0**-32
    return out[:, :count]


def normals(keys: np.ndarray, steps: np.ndarray, stream: int, count: int) -> np.ndarray:
    """`[N, count]` standard normals by Box-Muller over `uniforms` (both outputs of each pair used)."""
    pairs = (count + 1) // 2
    u = uniforms(keys, steps, stream, 2 * pairs)
    radius = np.sqrt(-2.0 * np.log(u[:, :pairs]))
    # float32 trigonometry is vectorised in numpy and ~3x faster; 1e-7 relative error is noise here.
    angle = ((2.0 * np.pi) * u[:, pairs:]).astype(np.float32)
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)], axis=1)[:, :count]
