"""Train an Ultravox + NEST speech LLM on a NeMo-style manifest.

    python -m agent.training.train --config configs/demo.yaml [key=value ...]

What is trained: the projector (layer-fusion weights included) always; the encoder unless
``train.encoder=freeze`` (a NEST built from a shape spec is trained from scratch, jointly with the
rest: no separate NEST self-supervised stage); the LLM fully, through LoRA, or not at all
(``train.llm``). Loss: cross-entropy on the reply tokens (+ end-of-turn token), optionally plus
KL distillation from the text-only LLM given the transcript (``loss.kl_weight``) and a text-only
cross-entropy term (``train.text_mix_weight``) and an auxiliary word-level CTC loss on the encoder
(``loss.ctc_weight``; its head is training-only and not saved in the model). A built LLM can first be pre-trained on the
domain's text (``train.text_pretrain_steps``), and the encoder on the word CTC alone
(``train.ctc_pretrain_steps``, logged to ``OUTPUT/encoder_pretrain.jsonl``).

Writes ``OUTPUT/checkpoints/step_N`` (self-contained checkpoint + ``trainer_state.pt`` to resume
from) every ``eval.save_every`` steps, ``OUTPUT/final`` (self-contained, what
`UltravoxInference` and ``serve.py --model`` load), ``OUTPUT/metrics.jsonl`` and
``OUTPUT/config.yaml``. With ``resume: true`` (default) a run continues from the last checkpoint.
"""
from __future__ import annotations

import argparse
import copy
import glob
import json
import math
import os
import random
import re
import shutil
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from agent.training.config import load_config, save_config
from agent.training.data import (Collator, ManifestDataset, TextPairSampler, end_of_turn_log_probs,
                                 end_of_turn_loss, epoch_batches, read_text_pairs, reply_loss, text_batch, turn_done)
from agent.training.lora import add_lora, has_lora, merged_copy

STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "training_config.yaml"


# -- building the model ---------------------------------------------------------------
def parse_llm_spec(spec: str) -> Optional[Tuple[int, int, int, int, int]]:
    """"build:small" / "build:H,L,heads,kv,inter" -> shape tuple; None for an HF id/folder."""
    if not spec.startswith("build:"):
        return None
    from agent.ultravox.text_models import LLM_SHAPES

    body = spec[len("build:"):]
    if body in LLM_SHAPES:
        return LLM_SHAPES[body]
    parts = [int(p) for p in body.split(",")]
    if len(parts) != 5:
        raise ValueError(f"text_model {spec!r}: expected build:SIZE ({sorted(LLM_SHAPES)}) or build:H,L,HEADS,KV,INTER")
    return tuple(parts)


def build_text_side(config: dict, corpus: List[str]):
    """(tokenizer, LLM) as the config asks."""
    spec = str(config["text_model"])
    shape = parse_llm_spec(spec)
    if shape is None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(spec)
        if "<|audio|>" not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": ["<|audio|>"]})
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        llm = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32)
        if len(tokenizer) > llm.get_input_embeddings().num_embeddings:
            llm.resize_token_embeddings(len(tokenizer))
        return tokenizer, llm
    from transformers import LlamaConfig, LlamaForCausalLM

    from agent.ultravox.text_models import build_tokenizer

    tokenizer = build_tokenizer(corpus, vocab_size=int(config["tokenizer_vocab_size"]))
    hidden, layers, heads, kv_heads, inter = shape
    llm_config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=inter,
                             max_position_embeddings=1024, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    llm = LlamaForCausalLM(llm_config)
    llm.generation_config.pad_token_id = tokenizer.pad_token_id
    llm.generation_config.eos_token_id = tokenizer.eos_token_id
    return tokenizer, llm


def nest_config_from_spec(spec: dict):
    """A NeMo NEST config (OmegaConf) from the config's audio_model mapping."""
    from agent.nest.configs import NestShape, nest_model_config

    shape = NestShape(**spec["shape"]) if isinstance(spec.get("shape"), dict) else spec.get("shape", "tiny")
    cfg = nest_model_config(shape, streaming=bool(spec.get("streaming", True)),
                            att_context_size=spec.get("att_context_size"),
                            causal_downsampling=bool(spec.get("causal_downsampling", False)),
                            normalize=spec.get("normalize"), dropout=float(spec.get("dropout", 0.1)))
    if spec.get("conv_norm_type"):
        cfg.encoder.conv_norm_type = spec["conv_norm_type"]
    from omegaconf import ListConfig

    sizes = cfg.encoder.att_context_size
    if len(sizes) and isinstance(sizes[0], (list, tuple, ListConfig)):
        # NeMo's multi-lookahead training: a list of [left, right] contexts, one drawn per
        # training forward with these probabilities; the first is the default at inference.
        from agent.nest.configs import uniform_probs

        probs = spec.get("att_context_probs") or uniform_probs(len(sizes))
        if len(probs) != len(sizes) or abs(sum(probs) - 1.0) > 1e-6:
            raise ValueError(f"att_context_probs {probs} must be one probability per att_context_size entry, summing to 1")
        probs = [float(p) for p in probs]
        probs[-1] = 1.0 - sum(probs[:-1])
        cfg.encoder.att_context_probs = probs
    return cfg


def set_lookaheads(tower, spec: dict) -> None:
    """Give a loaded (chunked-limited) NEST encoder the look-aheads of `spec`
    (``att_context_size`` list + ``att_context_probs``): the live module and the config that
    ``audio_encoder.nemo`` is saved with. A single [left, right] spec changes nothing."""
    from omegaconf import OmegaConf

    sizes = spec.get("att_context_size")
    if not sizes or not isinstance(sizes[0], (list, tuple)):
        return
    from agent.nest.configs import uniform_probs

    sizes = [[int(a), int(b)] for a, b in sizes]
    probs = [float(p) for p in (spec.get("att_context_probs") or uniform_probs(len(sizes)))]
    probs[-1] = 1.0 - sum(probs[:-1])
    enc = tower.encoder
    if enc.att_context_style != "chunked_limited":
        raise ValueError("set_lookaheads needs a chunked_limited encoder (streamify a full-context one first)")
    enc.att_context_size_all = sizes
    enc.att_context_probs = probs
    enc.set_default_att_context_size(sizes[0])
    cfg = tower.nemo_cfg
    OmegaConf.set_struct(cfg, False)
    cfg.encoder.att_context_size = sizes
    cfg.encoder.att_context_probs = probs


def build_audio_tower(config: dict):
    from agent.nest import NestEncoder

    source = config["audio_model"]
    if isinstance(source, dict):
        source = nest_config_from_spec(source)
    return NestEncoder(source, layer=config["audio_layers"])


def build_model(config: dict, corpus: List[str]):
    """A fresh UltravoxModel + tokenizer from the config."""
    from agent.ultravox.config import UltravoxConfig
    from agent.ultravox.model import UltravoxModel

    torch.manual_seed(int(config["seed"]))
    tokenizer, llm = build_text_side(config, corpus)
    tower = build_audio_tower(config)
    uv_config = UltravoxConfig(
        audio_config={"model_type": "nest", "_name_or_path": "", "layers": config["audio_layers"]},
        text_config=llm.config,
        stack_factor=int(config["stack_factor"]),
        projector_hidden_size=config["projector_hidden_size"],
        audio_token_index=tokenizer.convert_tokens_to_ids("<|audio|>"),
    )
    model = UltravoxModel(uv_config, audio_tower=tower, language_model=llm)
    return model, tokenizer


def make_processor(model, tokenizer):
    from agent.nest import NestProcessor
    from agent.ultravox.processor import UltravoxProcessor

    tower = model.audio_tower
    return UltravoxProcessor(
        audio_processor=NestProcessor(preprocessor=tower.preprocessor, pre_encode=tower.encoder.pre_encode),
        tokenizer=tokenizer, stack_factor=model.config.stack_factor,
        audio_context_size=model.config.audio_tower_context_length, audio_placeholder=model.config.audio_placeholder)


# -- saving / loading ------------------------------------------------------------------
def save_checkpoint(model, tokenizer, path: str, config: dict, state: Optional[dict] = None) -> None:
    """A self-contained checkpoint (LoRA folded in) + the training config (+ trainer state)."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    llm = model.language_model
    was_training = model.training
    model.eval()
    if has_lora(llm):
        model.language_model = merged_copy(llm)
    try:
        model.save_pretrained(tmp, tokenizer=tokenizer)
    finally:
        model.language_model = llm
        model.train(was_training)
    save_config(config, os.path.join(tmp, CONFIG_FILE))
    if state is not None:
        torch.save(state, os.path.join(tmp, STATE_FILE))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def checkpoints(output_dir: str) -> List[Tuple[int, str]]:
    found = []
    for path in glob.glob(os.path.join(output_dir, "checkpoints", "step_*")):
        m = re.search(r"step_(\d+)$", path)
        if m and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


PRETRAIN_METRICS = "encoder_pretrain.jsonl"  # the encoder CTC pre-training stage, one line per step


def load_checkpoint(path: str):
    from transformers import AutoTokenizer

    from agent.ultravox.model import UltravoxModel

    model = UltravoxModel.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


# -- losses ----------------------------------------------------------------------------
def reply_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Logits that predict each labelled token, in order: [N, V]."""
    return logits[:, :-1][labels[:, 1:] != -100]


def kl_loss(student_logits, student_labels, teacher_logits, teacher_labels, temperature: float) -> torch.Tensor:
    s = reply_logits(student_logits, student_labels).float() / temperature
    t = reply_logits(teacher_logits, teacher_labels).float() / temperature
    if s.shape != t.shape:
        raise RuntimeError(f"student/teacher reply positions differ: {tuple(s.shape)} vs {tuple(t.shape)}")
    return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean") * temperature ** 2


def lr_lambda(step: int, warmup: int, total: int, floor: float) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# -- the trainer -----------------------------------------------------------------------
class Trainer:
    def __init__(self, config: dict, log=print):
        self.config = config
        self.log = log
        tc = config["train"]
        torch.set_num_threads(int(tc.get("threads") or torch.get_num_threads()))
        self.out = config["output_dir"]
        os.makedirs(self.out, exist_ok=True)
        seed = int(config["seed"])
        random.seed(seed)
        np.random.seed(seed)
        if not config["data"]["train_manifest"]:
            raise ValueError("data.train_manifest is required")
        self.train_data = ManifestDataset.from_manifest(config["data"]["train_manifest"], config["data"]["max_train_items"])
        self.val_data = (ManifestDataset.from_manifest(config["data"]["val_manifest"])
                         if config["data"]["val_manifest"] else None)
        # Text pairs for the LLM (pre-training and the text-mix loss): a text manifest if given
        # (the demo's holds every combination of the domain), else the training transcripts.
        self.own_text = not config["data"]["text_manifest"]  # text pairs = the batch's own transcripts
        self.text_items = ([it for it in self.train_data.items if turn_done(it)] if self.own_text
                           else read_text_pairs(config["data"]["text_manifest"]))
        corpus = sorted({t for it in self.train_data.items + self.text_items for t in (it["text"], it["answer"])})
        corpus += [p for p in config["prompt"]["system_prompts"] if p]
        # Replies once more for each text pair that has them (a built tokenizer's BPE counts): the
        # out-of-domain decline answers hundreds of requests and gets whole-word tokens (14, not 41).
        corpus += [it["answer"] for it in self.text_items]
        self.step = 0
        self.text_pretrained = False
        self.encoder_pretrained = False
        resume_from = checkpoints(self.out)[-1][1] if config.get("resume") and checkpoints(self.out) else None
        self.resume_state = None
        if resume_from:
            self.model, self.tokenizer = load_checkpoint(resume_from)
            self.resume_state = torch.load(os.path.join(resume_from, STATE_FILE), weights_only=False)
            self.step = int(self.resume_state["step"])
            self.text_pretrained = self.encoder_pretrained = True
            self.log(f"resuming from {resume_from} (step {self.step})")
        elif config.get("init_from"):  # fine-tune a trained checkpoint (model + tokenizer) on this data
            self.model, self.tokenizer = load_checkpoint(str(config["init_from"]))
            if isinstance(config["audio_model"], dict):
                set_lookaheads(self.model.audio_tower, config["audio_model"])
            self.log(f"initialized from {config['init_from']}")
        else:
            if config["streamify"]["enabled"]:  # a pretrained full-context NEST -> a streaming student
                from agent.training.streamify import streamify_audio_model

                config["audio_model"] = streamify_audio_model(config, self.log)
            self.model, self.tokenizer = build_model(config, corpus)
        # The LLM's attention kernel while training (speed only); train() puts the model's own back.
        self.inference_attn = self.model.language_model.config._attn_implementation
        if tc.get("attn_implementation"):
            self.model.language_model.set_attn_implementation(str(tc["attn_implementation"]))
        self.processor = make_processor(self.model, self.tokenizer)
        self.model.config.audio_token_index = self.processor.audio_token_id
        self.teacher = None
        self.ctc_head = None
        if float(config["loss"].get("ctc_weight", 0.0)) > 0:
            words = sorted({w for it in self.train_data.items for w in it["text"].lower().split()})
            self.ctc_vocab = {w: i + 1 for i, w in enumerate(words)}  # 0 = blank
            torch.manual_seed(int(config["seed"]) + 5)
            self.ctc_head = torch.nn.Linear(self.model.config.audio_config.hidden_size, len(words) + 1)
            if self.resume_state is not None and self.resume_state.get("ctc_head") is not None:
                self.ctc_head.load_state_dict(self.resume_state["ctc_head"])
            self._tower_out = None
            self.model.audio_tower.register_forward_hook(lambda module, args, output: setattr(self, "_tower_out", output))
        self._setup_trainable()

    # -- parameters ------------------------------------------------------------------
    def _setup_trainable(self) -> None:
        tc = self.config["train"]
        model = self.model
        if tc["llm"] == "lora" and not has_lora(model.language_model):
            n = add_lora(model.language_model, int(tc["lora_rank"]), float(tc["lora_alpha"]))
            self.log(f"LoRA on {n} LLM linear layers (rank {tc['lora_rank']})")
        if self.resume_state is not None and self.resume_state.get("llm_state") is not None:
            model.language_model.load_state_dict(self.resume_state["llm_state"])
        for p in model.language_model.parameters():
            if tc["llm"] == "frozen":
                p.requires_grad_(False)
            elif tc["llm"] == "full":
                p.requires_grad_(True)
        for p in model.audio_tower.parameters():
            p.requires_grad_(tc["encoder"] == "train")
        for p in model.audio_tower.preprocessor.parameters():
            p.requires_grad_(False)
        for p in model.projector.parameters():
            p.requires_grad_(True)

    def _param_groups(self):
        tc = self.config["train"]
        lr = float(tc["lr"])
        groups = []
        for name, module, scale in (("encoder", self.model.audio_tower, tc["encoder_lr_scale"]),
                                    ("projector", self.model.projector, 1.0),
                                    ("llm", self.model.language_model, tc["llm_lr_scale"])):
            params = [p for p in module.parameters() if p.requires_grad]
            decay = [p for p in params if p.ndim >= 2]
            no_decay = [p for p in params if p.ndim < 2]
            for ps, wd in ((decay, float(tc["weight_decay"])), (no_decay, 0.0)):
                if ps:
                    groups.append({"params": ps, "lr": lr * float(scale), "weight_decay": wd, "name": name})
        if self.ctc_head is not None:
            groups.append({"params": list(self.ctc_head.parameters()), "lr": lr, "weight_decay": 0.0, "name": "ctc"})
        return groups

    def ctc_loss(self, items, out=None) -> torch.Tensor:
        """Auxiliary word-level CTC on the deepest selected encoder layer (training only: the
        head is not part of the checkpoint). It gives the from-scratch encoder a direct signal.
        `out`: the encoder output (default: the one the forward hook caught)."""
        out = out if out is not None else self._tower_out
        hidden, lengths = out.hidden_states[-1], out.lengths
        logp = F.log_softmax(self.ctc_head(hidden).float(), dim=-1).transpose(0, 1)
        targets = [[self.ctc_vocab[w] for w in it["text"].lower().split() if w in self.ctc_vocab] for it in items]
        flat = torch.tensor([t for ts in targets for t in ts], dtype=torch.long)
        target_lengths = torch.tensor([len(ts) for ts in targets], dtype=torch.long)
        return F.ctc_loss(logp, flat, lengths.long(), target_lengths, blank=0, zero_infinity=True)

    def count(self) -> Dict[str, float]:
        def n(m, trainable=False):
            return sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable) / 1e6

        return {"encoder_M": round(n(self.model.audio_tower.encoder), 3), "projector_M": round(n(self.model.projector), 3),
                "llm_M": round(n(self.model.language_model), 3), "trainable_M": round(n(self.model, True), 3)}

    # -- text pre-training --------------------------------------------------------------
    def _pretrain_stage(self, desc: str, params, steps: int, lr: float, warmup_cap: int, step_loss,
                        betas=(0.9, 0.999), clip: float = 1.0, on_step=None) -> Tuple[float, float]:
        """One stage of `steps` AdamW updates of `params` (warmup, cosine to 5%), each on the
        loss `step_loss()` returns. `on_step(step, loss, lr)` after each. Returns (last loss,
        moving average)."""
        from tqdm import tqdm

        opt = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, min(warmup_cap, steps // 10), steps, 0.05))
        bar = tqdm(range(steps), desc=desc, file=sys.stderr, mininterval=2.0)
        value = ema = float("nan")
        for step in bar:
            loss = step_loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            sched.step()
            value = loss.item()
            ema = value if step == 0 else 0.95 * ema + 0.05 * value
            bar.set_postfix(loss=f"{ema:.3f}")
            if on_step is not None:
                on_step(step + 1, value, sched.get_last_lr()[0])
        return value, ema

    def text_pretrain(self) -> None:
        tc = self.config["train"]
        steps = int(tc["text_pretrain_steps"])
        if steps <= 0 or self.text_pretrained:
            return
        llm = self.model.language_model
        llm.train()
        params = list(llm.parameters())
        for p in params:
            p.requires_grad_(True)
        rng = random.Random(int(self.config["seed"]) + 11)
        prompts = self.config["prompt"]["system_prompts"] or [None]
        sampler = TextPairSampler(self.text_items, rng)

        def step_loss():
            batch_items = sampler.sample(int(tc["text_pretrain_batch"]))
            inputs = text_batch(self.tokenizer, batch_items, [rng.choice(prompts) for _ in batch_items],
                                self.config["prompt"]["user_text"])
            return llm(**inputs).loss

        last, _ = self._pretrain_stage("text pre-train", params, steps, float(tc["text_pretrain_lr"]), 100, step_loss)
        self.text_pretrained = True
        self._setup_trainable()  # back to what the main stage trains
        self.log(f"text pre-training done: loss {last:.4f}")

    # -- encoder (CTC) pre-training ------------------------------------------------------
    def ctc_pretrain(self, collator: Collator, batches, autocast) -> None:
        """The encoder and the word-CTC head alone, before the LLM sees any audio. Trained
        jointly from scratch, the LLM learns to recognize a whole command from any part of it
        (and answers a held-out device/room combination with a trained one); an encoder that
        first learns to spell out each word where it is spoken gives it word-level evidence."""
        tc = self.config["train"]
        steps = int(tc["ctc_pretrain_steps"])
        if steps <= 0 or self.encoder_pretrained:
            return
        if self.ctc_head is None:
            raise ValueError("train.ctc_pretrain_steps needs loss.ctc_weight > 0 (the CTC head)")
        tower = self.model.audio_tower
        params = list(tower.encoder.parameters()) + list(self.ctc_head.parameters())
        for p in tower.encoder.parameters():
            p.requires_grad_(True)
        tower.train()
        tower.preprocessor.eval()
        start = time.time()

        def step_loss():
            batch = collator(self.train_data, next(batches), train=True)
            with autocast:
                out = tower(batch.inputs["input_features"], batch.inputs["feature_lengths"])
                return self.ctc_loss(batch.items, out)

        def log_step(step, value, lr):
            with open(os.path.join(self.out, PRETRAIN_METRICS), "a") as f:
                f.write(json.dumps({"step": step, "ctc": value, "lr": lr,
                                    "elapsed_s": round(time.time() - start, 1)}) + "\n")

        _, ema = self._pretrain_stage("encoder CTC pre-train", params, steps, float(tc["ctc_pretrain_lr"]), 200,
                                      step_loss, betas=(0.9, 0.98), clip=float(tc["grad_clip"]), on_step=log_step)
        self.encoder_pretrained = True
        self._setup_trainable()
        self.log(f"encoder CTC pre-training done: ctc loss {ema:.4f} (moving average)")

    # -- evaluation ------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, collator: Collator) -> Dict[str, Any]:
        from agent.training.evaluate import exact_match
        from agent.ultravox.inference import UltravoxInference

        data = self.val_data or self.train_data
        ec = self.config["eval"]
        self.model.eval()
        prompts = self.config["prompt"]["system_prompts"] or [None]
        losses = []
        eot_hits = eot_n = 0
        bs = int(self.config["train"]["batch_size"])
        for b in range(int(ec["val_batches"])):
            idx = list(range(b * bs, min(len(data), (b + 1) * bs)))
            if not idx:
                break
            batch = collator(data, idx, train=False, system_prompts=[prompts[i % len(prompts)] for i in idx])
            labels = batch.inputs["labels"]
            logits = self.model(**{k: v for k, v in batch.inputs.items() if k != "labels"}).logits
            losses.append(float(reply_loss(logits, labels)))
            log_done, _, _ = end_of_turn_log_probs(logits, batch.inputs["input_ids"], self.processor.audio_token_id)
            eot_hits += int(((log_done.exp() > 0.5).float() == batch.done).sum())
            eot_n += len(idx)
        inference = UltravoxInference.from_model(self.model, self.tokenizer)
        complete = [i for i in range(len(data)) if turn_done(data.items[i])]
        n = min(int(ec["n_generate"]), len(complete))
        hits = 0
        examples = []
        for i in complete[:n]:
            system = prompts[i % len(prompts)]
            pred = inference.generate("", audio=data.wave(i), system_prompt=system,
                                      max_new_tokens=int(ec["max_new_tokens"]))
            ok = exact_match(pred, data.items[i]["answer"])
            hits += ok
            if not ok and len(examples) < 3:
                examples.append(f"{data.items[i]['answer']!r} -> {pred!r}")
        self.model.train()
        self.model.audio_tower.preprocessor.eval()
        return {"val_loss": float(np.mean(losses)) if losses else None, "val_exact": hits / max(1, n),
                "val_eot_acc": eot_hits / max(1, eot_n), "errors": examples}

    # -- main loop ---------------------------------------------------------------------------
    def train(self) -> str:
        from tqdm import tqdm

        config, tc, ec = self.config, self.config["train"], self.config["eval"]
        save_config(config, os.path.join(self.out, "config.yaml"))
        start = time.time()
        self.text_pretrain()
        if float(config["loss"]["kl_weight"]) > 0:
            self.teacher = copy.deepcopy(merged_copy(self.model.language_model)).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        groups = self._param_groups()
        opt = torch.optim.AdamW(groups, lr=float(tc["lr"]), betas=(0.9, 0.98))
        total = int(tc["steps"])
        max_seconds = float(tc["max_minutes"]) * 60 if tc.get("max_minutes") else None
        time_schedule = bool(tc.get("time_schedule")) and max_seconds is not None
        clock = {"start": None}

        def schedule(s: int) -> float:
            # train.time_schedule: the cosine runs on max(step / steps, time / max_minutes), so a
            # slower (or shared) machine still ends at the floor lr when time runs out.
            if time_schedule and clock["start"] is not None and s >= int(tc["warmup_steps"]):
                frac = min(1.0, (time.time() - clock["start"]) / max_seconds)
                warm = int(tc["warmup_steps"])
                s = max(s, warm + int(frac * (total - warm)))
            return lr_lambda(s, int(tc["warmup_steps"]), total, float(tc["min_lr_ratio"]))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        if self.resume_state is not None:
            opt.load_state_dict(self.resume_state["optimizer"])
            sched.load_state_dict(self.resume_state["scheduler"])
        seed = int(config["seed"]) + self.step
        collator = Collator(self.processor, config["prompt"]["system_prompts"], config["prompt"]["user_text"],
                            augment=config["augment"], seed=seed,
                            with_text=float(config["loss"]["kl_weight"]) > 0 or (
                                float(tc["text_mix_weight"]) > 0 and self.own_text))
        eval_collator = Collator(self.processor, config["prompt"]["system_prompts"], config["prompt"]["user_text"],
                                 augment=None, seed=0)
        bucket = int(config["data"]["bucket_batches"] or 0)
        lengths = [len(w) for w in self.train_data.waves] if bucket else None
        batches = epoch_batches(len(self.train_data), int(tc["batch_size"]), random.Random(seed), lengths, bucket)
        autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if tc["precision"] == "bf16"
                    else torch.autocast("cpu", enabled=False))
        self.ctc_pretrain(collator, batches, autocast)
        text_sampler = TextPairSampler(self.text_items, random.Random(seed + 17))
        text_rng = random.Random(seed + 19)
        prompts = config["prompt"]["system_prompts"] or [None]
        self.model.train()
        self.model.audio_tower.preprocessor.eval()
        self.log(f"parameters: {self.count()}; {len(self.train_data)} training utterances")
        metrics_path = os.path.join(self.out, "metrics.jsonl")
        trainable = [p for g in groups for p in g["params"]]
        bar = tqdm(total=total, initial=self.step, desc="train", file=sys.stderr, mininterval=2.0)
        ema, utt, t0 = None, 0, time.time()
        clock["start"] = start
        stopped_early = False
        eot_weight = float(config["loss"].get("eot_weight", 0.0))
        audio_id = self.processor.audio_token_id
        while self.step < total:
            batch = collator(self.train_data, next(batches), train=True)
            with autocast:
                labels = batch.inputs["labels"]
                out = self.model(**{k: v for k, v in batch.inputs.items() if k != "labels"})
                loss = reply_loss(out.logits, labels)  # the HF mean, and 0 for a batch of cut turns only
                parts = {"ce": float(loss.detach())}
                if eot_weight > 0:
                    eot = end_of_turn_loss(out.logits, batch.inputs["input_ids"], audio_id, batch.done)
                    loss = loss + eot_weight * eot
                    parts["eot"] = float(eot.detach())
                    parts["cut_share"] = float(1 - batch.done.mean())
                if self.ctc_head is not None:
                    ctc = self.ctc_loss(batch.items)
                    loss = loss + float(config["loss"]["ctc_weight"]) * ctc
                    parts["ctc"] = float(ctc.detach())
                if self.teacher is not None:
                    with torch.no_grad():
                        t_logits = self.teacher(input_ids=batch.text_inputs["input_ids"],
                                                attention_mask=batch.text_inputs["attention_mask"]).logits
                    kl = kl_loss(out.logits, batch.inputs["labels"], t_logits, batch.text_inputs["labels"],
                                 float(config["loss"]["kl_temperature"]))
                    loss = loss + float(config["loss"]["kl_weight"]) * kl
                    parts["kl"] = float(kl.detach())
                if float(tc["text_mix_weight"]) > 0:
                    text_inputs = batch.text_inputs
                    if not self.own_text:
                        mix = text_sampler.sample(len(batch.items))
                        text_inputs = text_batch(self.tokenizer, mix, [text_rng.choice(prompts) for _ in mix],
                                                 config["prompt"]["user_text"])
                    text_loss = self.model.language_model(**text_inputs).loss
                    loss = loss + float(tc["text_mix_weight"]) * text_loss
                    parts["text"] = float(text_loss.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, float(tc["grad_clip"]))
            opt.step()
            sched.step()
            self.step += 1
            utt += len(batch.items)
            value = float(loss.detach())
            ema = value if ema is None else 0.95 * ema + 0.05 * value
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.3f}", lr=f"{sched.get_last_lr()[0]:.2e}",
                            utt_s=f"{utt / (time.time() - t0):.1f}")
            record = {"step": self.step, "loss": value, **parts, "lr": sched.get_last_lr()[0],
                      "grad_norm": float(grad_norm), "elapsed_s": round(time.time() - start, 1)}
            out_of_time = max_seconds is not None and time.time() - start > max_seconds
            if self.step % int(ec["every"]) == 0 or self.step == total or out_of_time:
                record.update(self.validate(eval_collator))
                bar.write(f"step {self.step}: loss {ema:.4f}, val loss {record['val_loss']}, "
                          f"val exact {record['val_exact']:.3f} {record['errors'][:2]}")
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.step % int(ec["save_every"]) == 0 or self.step == total or out_of_time:
                self.save(opt, sched)
            if out_of_time:
                stopped_early = True
                bar.write(f"train.max_minutes reached at step {self.step}: stopping")
                break
        bar.close()
        self.model.language_model.set_attn_implementation(self.inference_attn)
        final = os.path.join(self.out, "final")
        save_checkpoint(self.model, self.tokenizer, final, config)
        elapsed = time.time() - start
        self.log(f"done: {self.step} steps in {elapsed / 60:.1f} min{' (time limit)' if stopped_early else ''}; "
                 f"model in {final}")
        return final

    def save(self, opt, sched) -> None:
        llm_state = self.model.language_model.state_dict() if has_lora(self.model.language_model) else None
        state = {"step": self.step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "llm_state": llm_state,
                 "ctc_head": self.ctc_head.state_dict() if self.ctc_head is not None else None}
        path = os.path.join(self.out, "checkpoints", f"step_{self.step:06d}")
        save_checkpoint(self.model, self.tokenizer, path, self.config, state)
        for _, old in checkpoints(self.out)[:-int(self.config["eval"]["keep"])]:
            shutil.rmtree(old, ignore_errors=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config (see agent/training/config.py for the keys)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=200 output_dir=runs/x")
    args = p.parse_args(argv)
    config = load_config(args.config, args.overrides)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging

    for noisy in ("nemo_logger", "nv_one_logger"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    start = time.time()
    final = Trainer(config).train()
    print(f"final checkpoint: {final} (wall time {time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
