"""Load a NEST model from a `.nemo` file, a NeMo pretrained name, or a config,
and keep only what inference needs: the preprocessor and the encoder.

Pretrained names go through NeMo's own `from_pretrained` (which also finds a
`.nemo` already in the Hugging Face cache); the SSL decoder, quantizer, masking
and loss are dropped once the model is loaded.
"""
from __future__ import annotations

import copy
import glob
import os
from dataclasses import dataclass
from typing import Any, Union

import torch

from agent.nest._nemo import nemo_asr
from agent.nest.normalization import install_fixed_normalization

KNOWN_PRETRAINED = (
    "nvidia/ssl_en_nest_large_v1.0",
    "nvidia/ssl_en_nest_xlarge_v1.0",
    "nvidia/ssl_en_nest_base_v1.0",
    "nvidia/ssl_en_conformer_large",
    "nvidia/ssl_en_conformer_xlarge",
)

ModelSource = Union[str, os.PathLike, dict, Any]  # Any: an OmegaConf DictConfig


@dataclass
class NestParts:
    """What is kept of a NEST SSL model: its front end, its encoder and the full config."""

    preprocessor: torch.nn.Module
    encoder: torch.nn.Module
    cfg: Any  # OmegaConf DictConfig of the whole SSL model (needed to save a .nemo again)
    source: str


def _ssl_base_class():
    nemo_asr()
    from nemo.collections.asr.models.ssl_models import SpeechEncDecSelfSupervisedModel

    # The base class: restore_from instantiates the `target` saved in the .nemo
    # (EncDecDenoiseMaskedTokenPredModel for NEST, the plain SSL class for ssl_en_conformer).
    return SpeechEncDecSelfSupervisedModel


def _model_from_config(cfg) -> Any:
    from omegaconf import DictConfig, OmegaConf

    nemo_asr()
    from nemo.collections.asr.models.ssl_models import EncDecDenoiseMaskedTokenPredModel

    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    if "model" in cfg and "encoder" not in cfg:  # a full training yaml
        cfg = cfg.model
    missing = [k for k in ("preprocessor", "encoder") if k not in cfg]
    if missing:
        raise ValueError(f"NEST config lacks section(s) {missing}: expected a NeMo NEST model config")
    return EncDecDenoiseMaskedTokenPredModel(cfg=cfg)


def _from_pretrained(name: str):
    cls = _ssl_base_class()
    try:
        return cls.from_pretrained(name, map_location="cpu")
    except Exception as exc:  # offline: httpx / OfflineModeIsEnabled / FileNotFound, varies by version
        raise RuntimeError(
            f"Could not load the NeMo pretrained model {name!r} ({type(exc).__name__}: {exc}). "
            f"This machine may have no network access to fetch it: download the checkpoint "
            f"elsewhere and pass the local .nemo file instead (e.g. --nest-model /path/to/model.nemo), "
            f"or enable network access."
        ) from exc


def load_nest_parts(model_path: ModelSource) -> NestParts:
    """Load a NEST SSL model from `model_path` and keep its preprocessor and encoder.

    `model_path`: a `.nemo` file; a folder holding exactly one `.nemo`; a `.yaml`
    NeMo config; a dict / DictConfig config (random weights); or a NeMo
    pretrained name such as `nvidia/ssl_en_nest_large_v1.0`.
    """
    if not isinstance(model_path, (str, os.PathLike)):
        model, source = _model_from_config(model_path), "<config>"
    else:
        path = os.fspath(model_path)
        source = path
        if path.endswith(".nemo"):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"NEST checkpoint not found: {path}")
            model = _ssl_base_class().restore_from(path, map_location="cpu")
        elif path.endswith((".yaml", ".yml")):
            from omegaconf import OmegaConf

            model = _model_from_config(OmegaConf.load(path))
        elif os.path.isdir(path):
            found = sorted(glob.glob(os.path.join(path, "*.nemo")))
            if len(found) != 1:
                raise FileNotFoundError(f"expected exactly one .nemo file in {path}, found {len(found)}")
            return load_nest_parts(found[0])
        elif os.path.exists(path):
            raise ValueError(f"unsupported NEST model file {path!r}: give a .nemo file or a NeMo .yaml config")
        else:
            model = _from_pretrained(path)
    cfg = copy.deepcopy(model.cfg)
    # Fixed (streamable) normalization statistics, applied for any batch size (NeMo's own
    # fixed_mean path only handles a batch of one).
    install_fixed_normalization(model.preprocessor)
    parts = NestParts(model.preprocessor, model.encoder, cfg, source)
    del model  # drops the SSL decoder, quantizer, masking and loss
    return parts


def save_nest_nemo(parts_preprocessor, encoder, cfg, path: str) -> None:
    """Write a `.nemo` that NeMo's own `restore_from` opens, with our encoder weights.

    The SSL heads (decoder, quantizer) were dropped at load time; they are
    re-created from the config with fresh weights so the file stays a complete,
    loadable NeMo model. Only the encoder and preprocessor weights are meaningful.
    """
    model = _model_from_config(cfg)
    # The preprocessor's normalization lives in `cfg` (fixed statistics are non-persistent).
    model.preprocessor.load_state_dict(parts_preprocessor.state_dict())
    model.encoder.load_state_dict(encoder.state_dict())
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    model.save_to(path)
