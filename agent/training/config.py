"""Training configuration: a YAML file over these defaults, then `key=value` overrides.

    python -m agent.training.train --config configs/demo.yaml train.steps=200 output_dir=runs/try

Keys (dotted names are what an override uses):

* ``text_model``: a Hugging Face id or local folder of a causal LM (its tokenizer gets
  ``<|audio|>`` added), or ``build:SIZE`` for a fresh Llama from
  `agent.ultravox.text_models.LLM_SHAPES` (``build:tiny``, ``build:small``) or
  ``build:HIDDEN,LAYERS,HEADS,KV_HEADS,INTERMEDIATE``; a built LLM gets a byte-level BPE
  tokenizer trained on the domain's training text (``tokenizer_vocab_size``).
* ``audio_model``: a NEST source (a NeMo pretrained name, a ``.nemo`` file, a ``.yaml`` NeMo
  config) or a mapping ``{shape: {d_model, n_layers, n_heads, conv_channels, ...}, streaming,
  att_context_size, causal_downsampling, normalize, conv_norm_type, dropout}`` for a fresh NEST
  built with `agent.nest.configs.nest_model_config` (trained from scratch).
* ``audio_layers`` ("all", "last", "0,2,3" ...), ``stack_factor``, ``projector_hidden_size``.
* ``data.train_manifest`` / ``data.val_manifest``: NeMo-style JSONL (``audio_filepath``,
  ``text``, ``answer``, ``intent``). ``data.text_manifest``: optional text-only JSONL
  (``text``, ``answer``) that text pre-training and the text-mix loss draw from instead of the
  training transcripts (``synth --split text`` writes the demo domain's).
  ``data.bucket_batches``: batches are formed from pools of this many batches sorted by
  duration (less padding); 0 = plain shuffled batches.
* ``prompt.system_prompts``: a list (``null`` = no system prompt), one drawn per item;
  ``prompt.user_text``: text before the audio in the user turn ("" = audio only).
* ``train``: ``batch_size``, ``steps``, ``lr``, ``warmup_steps``, ``min_lr_ratio`` (cosine
  floor), ``weight_decay``, ``grad_clip``, ``precision`` (fp32 | bf16), ``llm`` (full | lora |
  frozen), ``llm_lr_scale``, ``lora_rank``, ``lora_alpha``, ``encoder`` (train | freeze),
  ``encoder_lr_scale``, ``text_pretrain_steps`` / ``text_pretrain_lr`` / ``text_pretrain_batch``
  (LLM on the domain text first, for a built LLM), ``ctc_pretrain_steps`` / ``ctc_pretrain_lr``
  (the encoder alone with the word-CTC head first, needs ``loss.ctc_weight`` > 0: it learns to
  hear each word where it is spoken before the LLM can learn whole-command shortcuts),
  ``text_mix_weight`` (text-only loss kept during joint training), ``max_minutes`` (stop and
  save when reached), ``threads``, ``attn_implementation`` (the LLM's attention while training:
  ``eager`` is faster than ``sdpa`` for the demo's short sequences on CPU, 0.59 vs 0.75 s/step
  with the README's 45-step speed command; the saved model keeps its own).
* ``audio_model.att_context_size`` may be a list of ``[left, right]`` contexts (NeMo's
  multi-lookahead training: one drawn per training forward, by ``audio_model.att_context_probs``,
  default equal; the first is the model's default at inference), so several streaming chunk
  sizes are ones the encoder was trained for.
* ``loss.eot_weight``: > 0 adds the end-of-turn decision loss: binary cross-entropy on p_done =
  softmax(logits at the last audio position)[the prompt's token after the audio, ChatML's
  ``<|im_end|>``], pushed up for complete turns and down for turns cut at a word boundary
  (manifest ``done: false``, from ``synth --cut-share``; cut turns get no reply loss).
  Not combined with ``kl_weight``.
* ``train.time_schedule``: with ``max_minutes``, the cosine lr runs on max(step / steps, elapsed /
  max_minutes), so a slower or shared machine still anneals to the floor by the deadline.
* ``loss``: ``kl_weight`` (> 0 adds Ultravox-style KL distillation from the text-only LLM
  given the transcript; 0 = cross-entropy on the reply tokens only), ``kl_temperature``,
  ``ctc_weight`` (> 0 adds an auxiliary word-level CTC loss on the encoder's deepest selected
  layer against the transcript: a direct training signal for an encoder trained from scratch).
* ``augment``: on-the-fly ``noise_prob``, ``snr_db``, ``gain_db``, ``speed_prob``, ``speed``,
  ``spec_augment`` {``freq_masks``, ``freq_width``, ``time_masks``, ``time_width``}.
* ``eval``: ``every`` (steps), ``val_batches``, ``n_generate`` (greedy exact match),
  ``save_every``, ``keep``.
* ``init_from``: a checkpoint folder (``OUTPUT/final``, ``agent/assets/demo_model``) to start from
  instead of building a model: its encoder, projector, LLM and tokenizer are fine-tuned
  (``text_model`` / ``audio_model`` shape are then ignored; an ``audio_model.att_context_size``
  list still sets the encoder's look-aheads).
* ``output_dir``, ``resume`` (continue from the last checkpoint in ``output_dir``).
* ``streamify``: make a pretrained full-context ``audio_model`` (the published NEST checkpoints:
  regular attention, symmetric convolutions, ``per_feature`` normalization) streamable before
  training, with `agent.training.streamify`: ``enabled`` (default false), ``output`` (the
  student ``.nemo``, default ``OUTPUT/streamified_nest.nemo``), ``manifest`` / ``val_manifest``
  (default ``data.train_manifest`` / ``data.val_manifest``), ``chunks_ms`` ("160,320,640"),
  ``left_context_ms``, ``layers``, ``steps``, ``max_minutes``, ``lr``, ``batch_size``. The
  student then is the ``audio_model`` the recipe trains with, and the final checkpoint streams
  exactly in ``serve.py``. A finished student is reused on a rerun; an unfinished one resumes.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional

DEFAULTS: Dict[str, Any] = {
    "seed": 0,
    "output_dir": "runs/train",
    "resume": True,
    "init_from": None,
    "text_model": "build:small",
    "tokenizer_vocab_size": 400,
    "audio_model": {
        "shape": {"d_model": 144, "n_layers": 4, "n_heads": 4, "conv_channels": 64, "ff_expansion_factor": 4,
                  "conv_kernel_size": 9, "num_classes": 16},
        "streaming": True,
        "att_context_size": [64, 1],
        "causal_downsampling": False,
        "normalize": "NA",
        "conv_norm_type": "batch_norm",
        "dropout": 0.1,
    },
    "audio_layers": "all",
    "stack_factor": 4,
    "projector_hidden_size": None,
    "domain_seed": 0,
    "data": {"train_manifest": None, "val_manifest": None, "text_manifest": None, "max_train_items": None,
             "bucket_batches": 32},
    "prompt": {"system_prompts": [None, "You are a home assistant. Answer briefly."], "user_text": ""},
    "train": {
        "batch_size": 32,
        "steps": 1000,
        "lr": 1.0e-3,
        "warmup_steps": 100,
        "min_lr_ratio": 0.05,
        "weight_decay": 0.01,
        "grad_clip": 1.0,
        "precision": "fp32",
        "llm": "full",
        "llm_lr_scale": 1.0,
        "lora_rank": 8,
        "lora_alpha": 16,
        "encoder": "train",
        "encoder_lr_scale": 1.0,
        "text_pretrain_steps": 0,
        "text_pretrain_lr": 2.0e-3,
        "text_pretrain_batch": 64,
        "ctc_pretrain_steps": 0,
        "ctc_pretrain_lr": 2.0e-3,
        "text_mix_weight": 0.0,
        "max_minutes": None,
        "threads": 2,
        "attn_implementation": None,
        "time_schedule": False,
    },
    "loss": {"kl_weight": 0.0, "kl_temperature": 1.0, "ctc_weight": 0.0, "eot_weight": 0.0},
    "augment": {
        "noise_prob": 0.5,
        "snr_db": [5.0, 30.0],
        "gain_db": [-12.0, 6.0],
        "speed_prob": 0.5,
        "speed": [0.9, 1.1],
        "spec_augment": {"freq_masks": 2, "freq_width": 12, "time_masks": 2, "time_width": 0.05},
    },
    "streamify": {"enabled": False, "output": None, "manifest": None, "val_manifest": None,
                  "chunks_ms": "160,320,640", "left_context_ms": 5120, "layers": "all", "steps": 2000,
                  "max_minutes": None, "lr": 5.0e-4, "batch_size": 8},
    "eval": {"every": 500, "val_batches": 4, "n_generate": 48, "save_every": 500, "keep": 2, "max_new_tokens": 16},
}


def _merge(base: dict, update: dict, path: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        where = f"{path}{key}"
        if key not in out:
            raise KeyError(f"unknown config key {where!r}")
        if isinstance(out[key], dict) and isinstance(value, dict) and key != "audio_model":
            out[key] = _merge(out[key], value, where + ".")
        elif key == "audio_model" and isinstance(value, dict) and isinstance(out[key], dict):
            merged = copy.deepcopy(out[key])
            for k, v in value.items():
                merged[k] = _merge(merged[k], v, f"{where}.{k}.") if isinstance(merged.get(k), dict) and isinstance(v, dict) else v
            out[key] = merged
        else:
            out[key] = value
    return out


def parse_override(item: str):
    import yaml

    if "=" not in item:
        raise ValueError(f"override {item!r} is not key=value")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    update: Dict[str, Any] = {}
    node = update
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return update


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> Dict[str, Any]:
    import yaml

    config = copy.deepcopy(DEFAULTS)
    if path:
        with open(path) as f:
            config = _merge(config, yaml.safe_load(f) or {})
    for item in overrides or []:
        config = _merge(config, parse_override(item))
    if config["train"]["llm"] not in ("full", "lora", "frozen"):
        raise ValueError(f"train.llm must be full, lora or frozen, got {config['train']['llm']!r}")
    if config["train"]["encoder"] not in ("train", "freeze"):
        raise ValueError(f"train.encoder must be train or freeze, got {config['train']['encoder']!r}")
    if config["train"]["precision"] not in ("fp32", "bf16"):
        raise ValueError(f"train.precision must be fp32 or bf16, got {config['train']['precision']!r}")
    return config


def save_config(config: Dict[str, Any], path: str) -> None:
    import yaml

    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
