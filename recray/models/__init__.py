"""The model zoo: `build(name, schema, **hparams)` validates hyperparameters and returns an nn.Module."""

from __future__ import annotations

from pydantic import ValidationError
from torch import nn

from recray.data.schema import Schema
from recray.models.dcnv2 import DCNv2
from recray.models.deepfm import DeepFM
from recray.models.din import DIN
from recray.models.dlrm import DLRM
from recray.models.dnn import DNN
from recray.models.lr import LogisticRegression

MODELS: dict[str, type[nn.Module]] = {
    "dcnv2": DCNv2,
    "deepfm": DeepFM,
    "din": DIN,
    "dlrm": DLRM,
    "dnn": DNN,
    "lr": LogisticRegression,
}


def available() -> list[str]:
    """Names `build` accepts."""
    return sorted(MODELS)


def build(name: str, schema: Schema, **hparams: object) -> nn.Module:
    """The model `name` for `schema`; `forward(batch)` returns logits `[B, len(schema.labels)]`."""
    if name not in MODELS:
        raise ValueError(f"model {name!r} is unknown; available models are {available()}")
    model_cls = MODELS[name]
    try:
        config = model_cls.Hparams(**hparams)
    except ValidationError as e:
        problems = [
            f"hparam {'.'.join(str(p) for p in err['loc'])}={err['input']!r}: {err['msg']}"
            for err in e.errors()
        ]
        raise ValueError(f"model {name!r}: {'; '.join(problems)}") from None
    return model_cls(schema, config)
