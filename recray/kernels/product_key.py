"""Public `product_key_topk` (product-key memory): checks its inputs, then dispatches."""

from __future__ import annotations

import torch

from recray.kernels import reference
from recray.kernels.dispatch import check_same_device, use_triton


def product_key_topk(
    query: torch.Tensor,
    keys_a: torch.Tensor,
    keys_b: torch.Tensor,
    values: torch.Tensor,
    k: int,
) -> torch.Tensor:
    """Product-key memory lookup (Lample et al. 2019) -> `[B, dv]` in values' dtype.

    query `[B, dim]` is split in halves scored against `keys_a [na, dim/2]` and
    `keys_b [nb, dim/2]`; slot (i, j) is row `i * nb + j` of `values [na * nb, dv]` and scores
    a_i + b_j. The k best slots come from the k x k pairs of the two half top-k sets (the
    na * nb grid is never scored); their softmax weights the gathered value rows. Gradients
    reach the query, the selected half-keys and the gathered value rows only.
    """
    _check_inputs(query, keys_a, keys_b, values, k)
    if use_triton(query):
        # Imported here so that `import recray.kernels` works where triton is absent.
        from recray.kernels.triton import product_key as triton_product_key

        impl = triton_product_key.product_key_topk
    else:
        impl = reference.product_key_topk
    return impl(query, keys_a, keys_b, values, k)


def _check_inputs(
    query: torch.Tensor,
    keys_a: torch.Tensor,
    keys_b: torch.Tensor,
    values: torch.Tensor,
    k: int,
) -> None:
    for name, t, shape in (
        ("query", query, "[B, dim]"),
        ("keys_a", keys_a, "[na, dim/2]"),
        ("keys_b", keys_b, "[nb, dim/2]"),
        ("values", values, "[na*nb, dv]"),
    ):
        if t.dim() != 2:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    dtypes = {t.dtype for t in (query, keys_a, keys_b, values)}
    if not query.is_floating_point() or len(dtypes) != 1:
        raise ValueError(
            "query, keys_a, keys_b, values: expected one floating dtype, got "
            f"{query.dtype}, {keys_a.dtype}, {keys_b.dtype}, {values.dtype}"
        )
    dim = query.shape[1]
    if dim % 2:
        raise ValueError(f"query: expected an even dim (split in two halves), got {dim}")
    for name, keys in (("keys_a", keys_a), ("keys_b", keys_b)):
        if keys.shape[1] != dim // 2:
            raise ValueError(
                f"{name}: expected dim {dim // 2} (half of query's), got {keys.shape[1]}"
            )
    slots = keys_a.shape[0] * keys_b.shape[0]
    if values.shape[0] != slots:
        raise ValueError(
            f"values: expected {slots} rows (na * nb = {keys_a.shape[0]} * {keys_b.shape[0]}), "
            f"got {values.shape[0]}"
        )
    limit = min(keys_a.shape[0], keys_b.shape[0])
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= limit:
        raise ValueError(f"k: expected an int in [1, min(na, nb) = {limit}], got {k!r}")
    check_same_device(query=query, keys_a=keys_a, keys_b=keys_b, values=values)
