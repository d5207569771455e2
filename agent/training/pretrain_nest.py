"""Pretrain a small full-context NEST with NeMo's own NEST objective, on our synthetic speech.

    python -m agent.training.pretrain_nest --out runs/nest_small/nest.nemo --manifest train.jsonl \\
        [--val-manifest val.jsonl] [--shape 144,4,4,32] [--steps 3000] [--max-minutes 30] [--lr 2e-3]

The model is NeMo's `EncDecDenoiseMaskedTokenPredModel` built from
`agent.nest.configs.nest_model_config` (the published NEST's layout, scaled down: regular
attention, symmetric convolutions, `per_feature` normalization, non-causal 8x subsampling),
so it is a stand-in for the published checkpoints with learned representations. Each step is
what the model's own `training_step` does (without needing a Lightning trainer): `forward`
with `apply_mask=True` on the (optionally noisy) audio -- block masking of the log-mel,
targets from the frozen random-projection quantizer of the *clean* audio -- then its
`MultiMLMLoss`. Denoising input: with `--noise-prob`, coloured noise at a random SNR is
added to the encoder input (the quantizer still sees clean speech), as NEST does with its
noise manifests. Writes the `.nemo` (NeMo `restore_from` and `NestEncoder` load it), and
OUT.pretrain/ (state.pt to resume from, metrics.jsonl). A rerun resumes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

STATE_FILE = "state.pt"


def parse_shape(text: str):
    from agent.nest.configs import NestShape

    parts = [int(p) for p in text.split(",")]
    if len(parts) != 4:
        raise ValueError(f"--shape is D_MODEL,LAYERS,HEADS,CONV_CHANNELS, got {text!r}")
    d, layers, heads, channels = parts
    return NestShape(d_model=d, n_layers=layers, n_heads=heads, conv_channels=channels, ff_expansion_factor=4,
                     conv_kernel_size=9, num_classes=256)


def build_model(shape, mask_prob: float, block_size: int):
    from agent.nest.configs import nest_model_config
    from agent.nest.loading import _model_from_config

    cfg = nest_model_config(shape, streaming=False, dropout=0.1)
    cfg.masking.mask_prob = mask_prob
    cfg.masking.block_size = block_size
    cfg.encoder.conv_norm_type = "batch_norm"
    return _model_from_config(cfg)


def nest_step_loss(model, audio, audio_len, noisy, noisy_len):
    """NeMo's EncDecDenoiseMaskedTokenPredModel.training_step, minus its Lightning logging."""
    log_probs, encoded_len, masks, tokens = model.forward(
        input_signal=audio, input_signal_length=audio_len, noisy_input_signal=noisy,
        noisy_input_signal_length=noisy_len, apply_mask=True)
    return model.loss(masks=masks, decoder_outputs=log_probs, targets=tokens, decoder_lengths=encoded_len)


def make_batch(waves, rng: np.random.Generator, max_samples: int, noise_prob: float, snr_db):
    from agent.training.synth import add_noise

    clean, noisy = [], []
    for w in waves:
        if len(w) > max_samples:
            off = int(rng.integers(0, len(w) - max_samples + 1))
            w = w[off: off + max_samples]
        w = (w * 10 ** (rng.uniform(-10, 6) / 20)).astype(np.float32)
        clean.append(w)
        if rng.random() < noise_prob:
            w = add_noise(w, float(rng.uniform(*snr_db)), rng, color=str(rng.choice(["white", "pink", "brown"])))
        noisy.append(w.astype(np.float32))
    lengths = torch.tensor([len(w) for w in clean])
    a = torch.zeros(len(clean), int(lengths.max()))
    b = torch.zeros_like(a)
    for i, (c, n) in enumerate(zip(clean, noisy)):
        a[i, : len(c)] = torch.from_numpy(c)
        b[i, : len(n)] = torch.from_numpy(n)
    return a, lengths, b, lengths.clone()


def main(argv=None) -> None:
    threads = torch.get_num_threads()
    try:
        with torch.enable_grad():  # even if the caller turned it off globally
            _main(argv)
    finally:
        torch.set_num_threads(threads)


def _main(argv=None) -> None:
    from tqdm import tqdm

    from agent.training.streamify import Waves, _read_items, lr_at

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help=".nemo to write")
    p.add_argument("--manifest", required=True)
    p.add_argument("--val-manifest", default=None)
    p.add_argument("--shape", default="144,4,4,32", help="D_MODEL,LAYERS,HEADS,CONV_CHANNELS")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--mask-prob", type=float, default=0.01, help="NeMo RandomBlockMasking (NEST's yaml: 0.01)")
    p.add_argument("--block-size", type=int, default=40, help="masked block in mel frames (NEST's yaml: 40)")
    p.add_argument("--noise-prob", type=float, default=0.5)
    p.add_argument("--snr-db", type=float, nargs=2, default=(0.0, 20.0))
    p.add_argument("--max-seconds", type=float, default=6.0)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train = Waves(_read_items(args.manifest))
    val = Waves(_read_items(args.val_manifest, 64)) if args.val_manifest else None
    model = build_model(parse_shape(args.shape), args.mask_prob, args.block_size)
    params = [q for q in model.parameters() if q.requires_grad]  # the quantizer is frozen (NeMo: freeze: true)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, args.steps, args.warmup_steps))
    sdir = (args.out[:-5] if args.out.endswith(".nemo") else args.out) + ".pretrain"
    os.makedirs(sdir, exist_ok=True)
    state_file = os.path.join(sdir, STATE_FILE)
    step = 0
    if os.path.isfile(state_file):
        saved = torch.load(state_file, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        step = int(saved["step"])
        print(f"resuming from {state_file} (step {step})", flush=True)
    n_params = sum(q.numel() for q in model.encoder.parameters()) / 1e6
    print(f"NEST encoder {n_params:.2f} M parameters; {len(train)} training utterances", flush=True)

    def save():
        torch.save({"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict()}, state_file + ".tmp")
        os.replace(state_file + ".tmp", state_file)

    @torch.no_grad()
    def val_loss():
        if val is None:
            return None
        model.eval()
        rng = np.random.default_rng(1234)  # the same masks and noise every time
        torch.manual_seed(1234)
        losses = []
        for start in range(0, len(val), args.batch_size):
            waves = [val[i] for i in range(start, min(len(val), start + args.batch_size))]
            losses.append(float(nest_step_loss(model, *make_batch(waves, rng, 10 ** 9, 0.0, args.snr_db))))
        model.train()
        return float(np.mean(losses))

    start_time = time.time()
    budget = args.max_minutes * 60 if args.max_minutes else None
    bar = tqdm(total=args.steps, initial=step, desc="NEST pretrain", file=sys.stderr, mininterval=5.0)
    model.train()
    ema = None
    max_samples = int(args.max_seconds * 16000)
    while step < args.steps:
        rng = np.random.default_rng([args.seed, step])
        idx = rng.integers(0, len(train), size=args.batch_size)
        batch = make_batch([train[int(i)] for i in idx], rng, max_samples, args.noise_prob, args.snr_db)
        loss = nest_step_loss(model, *batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        opt.step()
        sched.step()
        step += 1
        value = float(loss.detach())
        if not math.isfinite(value):
            raise RuntimeError(f"loss is {value} at step {step}")
        ema = value if ema is None else 0.98 * ema + 0.02 * value
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}")
        record = {"step": step, "loss": value, "grad_norm": grad, "lr": sched.get_last_lr()[0],
                  "elapsed_s": round(time.time() - start_time, 1)}
        out_of_time = budget is not None and time.time() - start_time > budget
        if step % args.eval_every == 0 or step == args.steps or out_of_time:
            record["val_loss"] = val_loss()
            bar.write(f"step {step}: loss {ema:.4f}, val loss {record['val_loss']}")
        with open(os.path.join(sdir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        if step % args.save_every == 0 or step == args.steps or out_of_time:
            save()
        if out_of_time:
            bar.write(f"--max-minutes reached at step {step}")
            break
    bar.close()
    save()
    model.eval()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    model.save_to(args.out)
    print(f"wrote {args.out} (step {step} of {args.steps}, {(time.time() - start_time) / 60:.1f} min)", flush=True)


if __name__ == "__main__":
    main()
