"""The model zoo: `build(name, schema, **hparams)` validates hyperparameters and returns an nn.Module."""

from __future__ import annotations

from pydantic import ValidationError
from torch import nn

from recray.data.schema import Schema
from recray.models.autoint import AutoInt
from recray.models.dcnv2 import DCNv2
from recray.models.deepfm import DeepFM
from recray.models.din import DIN
from recray.models.dlrm import DLRM
from recray.models.dnn import DNN
from recray.models.finalmlp import FinalMLP
from recray.models.fm import FM
from recray.models.gdcn import GDCN
from recray.models.hstu import HSTU
from recray.models.hyformer import HyFormer
from recray.models.lr import LogisticRegression
from recray.models.masknet import MaskNet
from recray.models.mdl import MDL
from recray.models.mmoe import MMoE
from recray.models.msn import MSN
from recray.models.ple import PLE
from recray.models.rankmixer import RankMixer
from recray.models.widedeep import WideDeep
from recray.models.xdeepfm import XDeepFM

MODELS: dict[str, type[nn.Module]] = {
    "autoint": AutoInt,
    "dcnv2": DCNv2,
    "deepfm": DeepFM,
    "din": DIN,
    "dlrm": DLRM,
    "dnn": DNN,
    "finalmlp": FinalMLP,
    "fm": FM,
    "gdcn": GDCN,
    "hstu": HSTU,
    "hyformer": HyFormer,
    "lr": LogisticRegression,
    "masknet": MaskNet,
    "mdl": MDL,
    "mmoe": MMoE,
    "msn": MSN,
    "ple": PLE,
    "rankmixer": RankMixer,
    "widedeep": WideDeep,
    "xdeepfm": XDeepFM,
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
