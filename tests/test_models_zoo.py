"""The peers' zoo (FM, WideDeep, AutoInt, xDeepFM, FinalMLP, MaskNet, GDCN, MMoE, PLE): each
model's own idea against a brute-force loop over its formula."""

from __future__ import annotations

import itertools

import pytest
import torch
from test_models import _batch, _schema

from recray.models import build
from recray.models.gdcn import GatedCrossNet
from recray.models.xdeepfm import CIN


def _model(name: str, **hparams):
    torch.manual_seed(0)
    return build(name, _schema(), **hparams).eval()


def test_fm_is_linear_plus_every_pair_of_fields():
    model = _model("fm")
    batch = _batch(_schema(), rows=6)
    fields, _ = model.fields(batch)
    pairs = sum(
        (fields[:, i] * fields[:, j]).sum(1, keepdim=True)
        for i, j in itertools.combinations(range(fields.shape[1]), 2)
    )
    torch.testing.assert_close(model(batch), model.first_order(batch) + pairs)


def test_cin_layer_matches_the_sum_over_field_pairs():
    torch.manual_seed(0)
    cin = CIN(num_fields=3, layer_sizes=[4, 2])
    x0 = torch.randn(5, 3, 6)
    x, pooled = x0, []
    for compress in cin.compress:
        weight = compress.weight.view(compress.out_features, x.shape[1], 3)
        nxt = torch.zeros(5, compress.out_features, 6)
        for k in range(compress.out_features):
            nxt[:, k] = compress.bias[k]
            for h in range(x.shape[1]):
                for m in range(3):
                    nxt[:, k] += weight[k, h, m] * x[:, h] * x0[:, m]
        pooled.append(nxt.sum(2))
        x = nxt
    torch.testing.assert_close(cin(x0), torch.cat(pooled, 1), rtol=1e-5, atol=1e-5)


def test_gated_cross_net_follows_its_recurrence():
    torch.manual_seed(0)
    net = GatedCrossNet(dim=5, layers=2)
    c0 = torch.randn(4, 5)
    c = c0
    for cross, gate in zip(net.cross, net.gates, strict=True):
        c = c0 * (c @ cross.weight.T + cross.bias) * torch.sigmoid(c @ gate.weight.T) + c
    torch.testing.assert_close(net(c0), c)


def test_mmoe_mixes_shared_experts_per_task():
    model = _model("mmoe", experts=3)
    batch = _batch(_schema(), rows=4)
    x = torch.cat([*model.embedding.fields(batch.sparse), batch.dense], 1)
    expected = torch.zeros(4, 2)
    for task in range(2):
        weights = torch.softmax(model.gates[task](x), 1)
        for row in range(4):
            mixed = sum(weights[row, e] * model.experts[e](x[row : row + 1]) for e in range(3))
            expected[row, task] = model.towers[task](mixed)[0, 0]
    torch.testing.assert_close(model(batch), expected, rtol=1e-5, atol=1e-6)


def test_ple_task_gates_see_only_their_own_and_shared_experts():
    model = _model("ple", levels=1, task_experts=2, shared_experts=1)
    level = model.levels[0]
    assert level.shared_gate is None  # the last level feeds only the towers
    assert [g.out_features for g in level.task_gates] == [3, 3]
    batch = _batch(_schema(), rows=4)
    x = torch.cat([*model.embedding.fields(batch.sparse), batch.dense], 1)
    expected = []
    for task in range(2):
        experts = [e(x) for e in level.task_experts[task]] + [e(x) for e in level.shared_experts]
        weights = torch.softmax(level.task_gates[task](x), 1)
        mixed = sum(weights[:, i : i + 1] * out for i, out in enumerate(experts))
        expected.append(model.towers[task](mixed))
    torch.testing.assert_close(model(batch), torch.cat(expected, 1), rtol=1e-5, atol=1e-6)


def test_widedeep_is_its_wide_part_plus_its_deep_part():
    model = _model("widedeep")
    batch = _batch(_schema(), rows=4)
    deep_in = torch.cat([*model.embedding.fields(batch.sparse), batch.dense], 1)
    torch.testing.assert_close(model(batch), model.wide(batch) + model.deep(deep_in))


def test_autoint_plus_adds_an_mlp_and_plain_autoint_has_none():
    assert _model("autoint").dnn is None
    plus = _model("autoint", plus=True)
    batch = _batch(_schema(), rows=4)
    fields, _ = plus.fields(batch)
    attention_only = plus.head(plus.interacting(fields).flatten(1))
    torch.testing.assert_close(plus(batch), attention_only + plus.dnn(fields.flatten(1)))


@pytest.mark.parametrize("structure", ["serial", "parallel"])
def test_masknet_masks_come_from_the_embeddings(structure):
    model = _model("masknet", structure=structure, blocks=2)
    batch = _batch(_schema(), rows=4)
    e = torch.cat([*model.embedding.fields(batch.sparse), batch.dense], 1)
    first = model.blocks[0]
    # A MaskBlock is ReLU(LN(W (mask(e) * h))): zero the mask and its output is ReLU(LN(0)).
    torch.nn.init.zeros_(first.mask[-1].weight)
    torch.nn.init.zeros_(first.mask[-1].bias)
    torch.testing.assert_close(
        first(e, model.norm(e)), torch.relu(first.norm.bias).expand(4, -1).contiguous()
    )


def test_finalmlp_contexts_must_be_id_features():
    with pytest.raises(ValueError, match=r"finalmlp: context1 names \['price'\], not id features"):
        build("finalmlp", _schema(), context1=["price"])
    model = _model("finalmlp", context1=["user_id"], context2=["item_id", "genres"])
    assert model(_batch(_schema(), rows=4)).shape == (4, 2)
    with pytest.raises(ValueError, match="fusion_heads=3 must divide hidden's output width 64"):
        build("finalmlp", _schema(), fusion_heads=3)
