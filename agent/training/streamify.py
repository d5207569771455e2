"""Convert a full-context NEST into a cache-aware streaming encoder by feature distillation.

    python -m agent.training.streamify --nest-model nvidia/ssl_en_nest_large_v1.0 --out nest_streaming.nemo \\
        --manifest train.jsonl [--val-manifest val.jsonl] [--chunks-ms 160,320,640] [--left-context-ms 5120] \\
        [--layers all] [--steps 2000] [--max-minutes 60] [--lr 5e-4]

Student: the teacher's weights in a cache-aware encoder (`agent.nest.configs.cache_aware_config`):
`chunked_limited` attention trained with NeMo's multi-lookahead scheme (one `att_context_size`
entry per chunk size, equal `att_context_probs`: each training forward draws one), causal
depthwise convolutions initialised from the teacher's kernels (past and centre taps kept in
place, the future taps folded into the centre one, so a slowly varying input gives the
teacher's response), NEST's non-causal subsampling kept (it streams exactly with 8-aligned
chunks), and fixed per-mel-bin normalization measured on the training audio
(`agent.nest.normalization`) instead of `per_feature`.

Loss: on every selected layer, `(1 - cos) + l1_weight * |s - t| / mean|t|` against the frozen
full-context teacher on the same (gain-augmented) audio, averaged over valid frames and layers.
Random gains teach the student the level invariance that per-utterance normalization gave the
teacher.

Writes DST.nemo (NeMo `restore_from` and `NestEncoder` load it; `StreamingNestEncoder` streams
it exactly at every trained chunk), DST.report.json (cosine per chunk size and layer to the
teacher's offline features on the val audio: teacher streamed naively vs student streamed) and
DST.streamify/ (state.pt to resume from, metrics.jsonl). Rerunning the same command resumes;
`--max-minutes` stops cleanly, saving everything, and a rerun continues to `--steps`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from agent.nest.capture import capture_layers

FRAME_MS = 80
STATE_FILE = "state.pt"
METRICS_FILE = "metrics.jsonl"


def report_path(out: str) -> str:
    return (out[: -len(".nemo")] if out.endswith(".nemo") else out) + ".report.json"


def state_dir(out: str) -> str:
    return (out[: -len(".nemo")] if out.endswith(".nemo") else out) + ".streamify"


def parse_chunks(text: str) -> List[int]:
    """"160,320,640" (ms) -> chunk sizes in 80 ms encoder frames."""
    frames = []
    for part in str(text).split(","):
        ms = int(part)
        if ms < FRAME_MS or ms % FRAME_MS:
            raise ValueError(f"--chunks-ms entries must be positive multiples of {FRAME_MS} ms, got {ms}")
        frames.append(ms // FRAME_MS)
    return frames


# -- the student ------------------------------------------------------------------------
def causal_kernel_from(weight: torch.Tensor) -> torch.Tensor:
    """A causal depthwise kernel [C, 1, k] from a symmetric one: taps for offsets -h..0 keep
    their place (shifted to the right end), taps for future offsets 1..h are added to the
    current frame's tap, so a locally constant input gives the teacher's output."""
    k = weight.shape[-1]
    half = (k - 1) // 2
    causal = torch.zeros_like(weight)
    causal[..., k - 1 - half:] = weight[..., : half + 1]
    causal[..., k - 1] += weight[..., half + 1:].sum(-1)
    return causal


@dataclass
class Student:
    cfg: object  # NeMo config of the whole SSL model (saved into the .nemo)
    preprocessor: torch.nn.Module
    encoder: torch.nn.Module


def build_student(teacher, mean: torch.Tensor, std: torch.Tensor, chunks: Sequence[int], left_frames: int,
                  conv_init: str = "shift", normalization: str = "fixed") -> Student:
    """The teacher's weights in a cache-aware NEST with fixed normalization (see the module doc).
    `normalization="NA"`: no normalization at all (NeMo's cache-aware configs), for comparison."""
    from agent.nest.configs import cache_aware_config, chunk_context_sizes
    from agent.nest.loading import _model_from_config
    from agent.nest.normalization import fixed_normalize_config, install_fixed_normalization

    if normalization not in ("fixed", "NA"):
        raise ValueError(f"normalization must be fixed or NA, got {normalization!r}")
    normalize = fixed_normalize_config(mean, std) if normalization == "fixed" else "NA"
    cfg = cache_aware_config(teacher.nemo_cfg, chunk_context_sizes(chunks, left_frames), normalize=normalize)
    model = _model_from_config(cfg)
    encoder, preprocessor = model.encoder, model.preprocessor
    del model  # the SSL heads are re-created from cfg when saving
    # Same shapes: NEST weights load strictly into the cache-aware encoder (NEMO_FACTS).
    encoder.load_state_dict(teacher.encoder.state_dict(), strict=True)
    if conv_init == "shift":
        with torch.no_grad():
            for layer in encoder.layers:
                conv = layer.conv.depthwise_conv
                conv.weight.copy_(causal_kernel_from(conv.weight))
    elif conv_init != "copy":
        raise ValueError(f"conv_init must be shift or copy, got {conv_init!r}")
    install_fixed_normalization(preprocessor)
    return Student(cfg, preprocessor.eval(), encoder)


# -- data -------------------------------------------------------------------------------
class Waves:
    """Manifest audio, read on demand (a manifest may not fit in memory)."""

    def __init__(self, items: List[dict]):
        self.items = items
        self._cache: Dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> np.ndarray:
        from agent.training.data import load_wave

        wave = self._cache.get(i)
        if wave is None:
            wave = load_wave(self.items[i]["audio_filepath"])
            if len(self._cache) < 4096:  # small synthetic sets stay in memory
                self._cache[i] = wave
        return wave


def batch_waves(waves: List[np.ndarray]):
    lengths = torch.tensor([len(w) for w in waves], dtype=torch.long)
    batch = torch.zeros(len(waves), max(1, int(lengths.max())))
    for i, w in enumerate(waves):
        batch[i, : len(w)] = torch.from_numpy(w)
    return batch, lengths


def layer_outputs(encoder, preprocessor, signal, lengths, layers: Sequence[int]):
    """[K, B, T, D] selected layers and [B] frame lengths."""
    mel, mel_len = preprocessor(input_signal=signal, length=lengths)
    with capture_layers(encoder, layers) as captured:
        _, enc_len = encoder(audio_signal=mel, length=mel_len)
    return torch.stack([captured[i] for i in layers]), enc_len


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, lengths: torch.Tensor, l1_weight: float):
    """Per-layer (1 - cos) + l1_weight * L1 / mean|teacher| over valid frames, averaged over layers.
    Returns (loss, mean cosine as a float)."""
    valid = torch.arange(student.shape[2])[None, :] < lengths[:, None]  # [B, T]
    s, t = student[:, valid], teacher[:, valid]  # [K, N, D]
    cos = F.cosine_similarity(s, t, dim=-1)  # [K, N]
    scale = t.abs().mean(dim=(1, 2), keepdim=True).clamp(min=1e-6)
    l1 = ((s - t).abs() / scale).mean(dim=(1, 2))
    loss = ((1 - cos).mean(1) + l1_weight * l1).mean()
    return loss, float(cos.mean().detach())


def set_train_mode(encoder, dropout: bool, batchnorm: bool) -> None:
    """Training mode for NeMo's per-forward look-ahead draw, with dropout and batch-norm
    statistics updates only if asked. Frozen batch-norm statistics (the teacher's) suit
    small distillation batches: padded frames and a few utterances per batch would
    otherwise pull the running statistics away from what the layers were trained with."""
    encoder.train()
    for module in encoder.modules():
        if isinstance(module, torch.nn.Dropout) and not dropout:
            module.eval()
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not batchnorm:
            module.eval()


def lr_at(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


# -- evaluation -------------------------------------------------------------------------
@torch.no_grad()
def offline_chunk_metrics(teacher, student: Student, waves: List[np.ndarray], chunks: Sequence[int],
                          left_frames: int, layers: Sequence[int]):
    """Per chunk size (ms): the mean cosine (over layers and frames) of the student's chunked
    offline forward to the teacher's full-context one, and the relative L1 distance
    (`|s - t| / mean|t|`, as in the loss). The chunked offline forward equals streaming
    exactly, so these are the streamed figures at a fraction of the cost (for progress)."""
    signal, lengths = batch_waves(waves)
    ref, ref_len = layer_outputs(teacher.encoder, teacher.preprocessor, signal, lengths, layers)
    student.encoder.eval()  # the caller puts it back in training mode
    cos, rel_l1 = {}, {}
    try:
        for chunk in chunks:
            student.encoder.set_default_att_context_size([left_frames, chunk - 1])
            got, _ = layer_outputs(student.encoder, student.preprocessor, signal, lengths, layers)
            valid = torch.arange(got.shape[2])[None, :] < ref_len[:, None]
            s, t = got[:, valid], ref[:, valid]
            cos[chunk * FRAME_MS] = float(F.cosine_similarity(s, t, dim=-1).mean())
            rel_l1[chunk * FRAME_MS] = float(((s - t).abs().mean(dim=(1, 2)) / t.abs().mean(dim=(1, 2))).mean())
    finally:
        student.encoder.set_default_att_context_size([left_frames, chunks[0] - 1])
    return cos, rel_l1


# -- the run ----------------------------------------------------------------------------
def _read_items(manifest: str, limit: Optional[int] = None) -> List[dict]:
    from agent.training.data import read_manifest

    items = read_manifest(manifest, limit)
    if not items:
        raise ValueError(f"{manifest}: no items")
    return items


def split_items(args) -> tuple:
    train = _read_items(args.manifest)
    if args.val_manifest:
        return train, _read_items(args.val_manifest, args.val_items)
    if len(train) <= args.val_items:
        raise ValueError(f"{args.manifest}: {len(train)} items; need more than --val-items ({args.val_items}) "
                         f"to hold some out for validation, or pass --val-manifest")
    # No val manifest: the last items are held out, never trained on.
    return train[: -args.val_items], train[-args.val_items:]


def run(args, log=print) -> dict:
    """Distill, save, report (see the module doc). Returns the report."""
    threads = torch.get_num_threads()
    try:
        # Grad on even if the caller (a server, a test) turned it off globally.
        with torch.enable_grad():
            return _run(args, log)
    finally:
        torch.set_num_threads(threads)


def _run(args, log=print) -> dict:
    from tqdm import tqdm

    from agent.nest import NestEncoder
    from agent.nest.loading import save_nest_nemo
    from agent.nest.normalization import measure_mel_statistics
    from agent.nest.streaming_report import format_student_rows, student_rows

    torch.set_num_threads(int(args.threads or torch.get_num_threads()))
    chunks = parse_chunks(args.chunks_ms)
    if args.left_context_ms % FRAME_MS:
        raise ValueError(f"--left-context-ms must be a multiple of {FRAME_MS}")
    left = args.left_context_ms // FRAME_MS
    train_items, val_items = split_items(args)
    train, val = Waves(train_items), Waves(val_items)
    val_waves = [val[i] for i in range(len(val))]

    teacher = NestEncoder(args.nest_model, layer=args.layers)
    for p in teacher.parameters():
        p.requires_grad_(False)
    style = teacher.encoder.att_context_style
    if style == "chunked_limited" and teacher.preprocessor.featurizer.normalize in (None, "NA"):
        log(f"note: {args.nest_model} is already cache-aware ({style}); distilling it anyway")
    layers = list(teacher.layer_indices)

    sdir = state_dir(args.out)
    os.makedirs(sdir, exist_ok=True)
    state_file = os.path.join(sdir, STATE_FILE)
    saved = torch.load(state_file, weights_only=False) if os.path.isfile(state_file) and args.resume else None
    if saved is not None:
        if saved["chunks"] != chunks or saved["left"] != left or saved["layers"] != layers or \
                saved.get("normalization", "fixed") != args.normalization:
            raise ValueError(f"{state_file} was written for chunks {saved['chunks']}, left {saved['left']}, layers "
                             f"{saved['layers']}: delete {sdir} or pass --no-resume to start over")
        mean, std, count = saved["mean"], saved["std"], saved["stat_frames"]
        log(f"resuming from {state_file} (step {saved['step']})")
    else:
        calib = (train[i] for i in range(min(len(train), args.calibration_items)))
        mean, std, count = measure_mel_statistics(teacher.preprocessor, calib)
        log(f"fixed normalization: per-bin statistics of {count} mel frames "
            f"({min(len(train), args.calibration_items)} training utterances)")
    student = build_student(teacher, mean, std, chunks, left, conv_init=args.conv_init,
                            normalization=args.normalization)
    params = [p for p in student.encoder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    total = int(args.steps)
    warmup = min(args.warmup_steps, max(1, total // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, total, warmup))
    step = 0
    if saved is not None:
        student.encoder.load_state_dict(saved["encoder"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        step = int(saved["step"])

    def save_state():
        torch.save({"step": step, "encoder": student.encoder.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "mean": mean, "std": std, "stat_frames": count,
                    "chunks": chunks, "left": left, "layers": layers, "normalization": args.normalization,
                    "teacher": str(args.nest_model)},
                   state_file + ".tmp")
        os.replace(state_file + ".tmp", state_file)

    metrics = os.path.join(sdir, METRICS_FILE)
    start = time.time()
    budget = args.max_minutes * 60 if args.max_minutes else None
    if step == 0:
        initial, initial_l1 = offline_chunk_metrics(teacher, student, val_waves, chunks, left, layers)
        log(f"step 0: val cosine to the teacher per chunk ms {_fmt(initial)}; relative L1 {_fmt(initial_l1)}")
        with open(metrics, "a") as f:
            f.write(json.dumps({"step": 0, "val_cos": initial, "val_rel_l1": initial_l1}) + "\n")
    bar = tqdm(total=total, initial=step, desc="streamify", file=sys.stderr, mininterval=2.0)
    max_samples = int(args.max_seconds * 16000)
    stopped = False
    ema = None
    student.encoder.train()
    set_train_mode(student.encoder, args.dropout, args.batchnorm)
    while step < total:
        rng = np.random.default_rng([args.seed, step])
        random.seed(args.seed * 1_000_003 + step)  # NeMo draws each forward's look-ahead with `random`
        idx = rng.integers(0, len(train), size=args.batch_size)
        waves = []
        for i in idx:
            w = train[int(i)]
            if len(w) > max_samples:  # a random crop bounds the cost of long utterances
                off = int(rng.integers(0, len(w) - max_samples + 1))
                w = w[off: off + max_samples]
            gain = 10 ** (rng.uniform(*args.gain_db) / 20)
            waves.append((w * gain).astype(np.float32))
        signal, lengths = batch_waves(waves)
        with torch.no_grad():
            target, t_len = layer_outputs(teacher.encoder, teacher.preprocessor, signal, lengths, layers)
        got, _ = layer_outputs(student.encoder, student.preprocessor, signal, lengths, layers)
        loss, cos = distill_loss(got, target, t_len, args.l1_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, args.grad_clip))
        opt.step()
        sched.step()
        step += 1
        value = float(loss.detach())
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.4f}", cos=f"{cos:.4f}")
        record = {"step": step, "loss": value, "cos": cos, "lr": sched.get_last_lr()[0],
                  "grad_norm": grad_norm, "elapsed_s": round(time.time() - start, 1)}
        out_of_time = budget is not None and time.time() - start > budget
        if step % args.eval_every == 0 or step == total or out_of_time:
            record["val_cos"], record["val_rel_l1"] = offline_chunk_metrics(teacher, student, val_waves, chunks,
                                                                            left, layers)
            set_train_mode(student.encoder, args.dropout, args.batchnorm)
            bar.write(f"step {step}: loss {ema:.4f}, val cosine per chunk ms {_fmt(record['val_cos'])}; "
                      f"relative L1 {_fmt(record['val_rel_l1'])}")
        with open(metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
        if step % args.save_every == 0 or step == total or out_of_time:
            save_state()
        if out_of_time:
            stopped = True
            bar.write(f"--max-minutes {args.max_minutes} reached at step {step}: saved; rerun to continue")
            break
    bar.close()
    save_state()
    student.encoder.eval()
    student.encoder.set_default_att_context_size([left, chunks[0] - 1])
    save_nest_nemo(student.preprocessor, student.encoder, student.cfg, args.out)
    log(f"wrote {args.out} (step {step} of {total}{', time limit' if stopped else ''})")

    # The report streams the saved file through the real loading code.
    saved_student = NestEncoder(args.out, layer=layers)
    rows = student_rows(teacher, saved_student, val_waves[: args.report_items], [c * FRAME_MS for c in chunks],
                        args.left_context_ms)
    report = {"teacher": str(args.nest_model), "student": os.path.abspath(args.out), "steps": step,
              "target_steps": total, "stopped_by_time": stopped, "val_utterances": min(len(val_waves), args.report_items),
              "chunks_ms": [c * FRAME_MS for c in chunks], "left_context_ms": args.left_context_ms,
              "normalization_frames": count, "rows": rows}
    with open(report_path(args.out), "w") as f:
        json.dump(report, f, indent=2)
    log("cosine to the teacher's full-context features on the val audio (naive = teacher streamed, "
        "approximate=True):")
    log(format_student_rows(rows))
    log(f"report: {report_path(args.out)}")
    return report


def streamify_audio_model(config: dict, log=print) -> str:
    """The recipe's `streamify:` section (agent.training.config): distill the pretrained
    `audio_model` into a streaming student and return the student's path. A student that
    already reached its steps is reused; an unfinished one resumes."""
    sc = config["streamify"]
    source = config["audio_model"]
    if not isinstance(source, str):
        raise ValueError("streamify.enabled needs a pretrained audio_model (a .nemo or NeMo name); a fresh NEST "
                         "from a shape spec is built streaming already (audio_model.streaming: true)")
    out = sc.get("output") or os.path.join(config["output_dir"], "streamified_nest.nemo")
    manifest = sc.get("manifest") or config["data"]["train_manifest"]
    val = sc.get("val_manifest") or config["data"]["val_manifest"]
    if os.path.isfile(out) and os.path.isfile(report_path(out)):
        with open(report_path(out)) as f:
            done = json.load(f)
        if done.get("teacher") == str(source) and done.get("steps", 0) >= int(sc["steps"]):
            log(f"streamify: reusing {out} ({done['steps']} steps)")
            return out
    argv = ["--nest-model", str(source), "--out", out, "--manifest", manifest, "--chunks-ms", str(sc["chunks_ms"]),
            "--left-context-ms", str(sc["left_context_ms"]), "--layers", str(sc["layers"]),
            "--steps", str(sc["steps"]), "--lr", str(sc["lr"]), "--batch-size", str(sc["batch_size"]),
            "--seed", str(config["seed"])]
    if val:
        argv += ["--val-manifest", val]
    if sc.get("max_minutes"):
        argv += ["--max-minutes", str(sc["max_minutes"])]
    if config["train"].get("threads"):
        argv += ["--threads", str(config["train"]["threads"])]
    report = run(build_parser().parse_args(argv), log=log)
    if report["stopped_by_time"]:
        log(f"streamify stopped by streamify.max_minutes at step {report['steps']} of {report['target_steps']}: "
            f"training on the partly distilled student (rerun to continue it)")
    return out


def _fmt(values: Dict[int, float]) -> str:
    return ", ".join(f"{k}: {v:.4f}" for k, v in values.items())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nest-model", required=True, help="teacher: anything NestEncoder loads (.nemo, NeMo name, .yaml)")
    p.add_argument("--out", required=True, help="student .nemo to write")
    p.add_argument("--manifest", required=True, help="training JSONL (audio_filepath, duration, text)")
    p.add_argument("--val-manifest", default=None, help="validation JSONL (default: the last --val-items of --manifest)")
    p.add_argument("--chunks-ms", default="160,320,640", help="chunk sizes to train for (multiples of 80 ms)")
    p.add_argument("--left-context-ms", type=int, default=5120)
    p.add_argument("--layers", default="all", help="layers to distill (and to report): all, last, 0,2,4 ...")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--max-minutes", type=float, default=None, help="stop (saving everything) after this long")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--l1-weight", type=float, default=0.5)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--gain-db", type=float, nargs=2, default=(-12.0, 6.0), metavar=("MIN", "MAX"),
                   help="random gain range applied to teacher and student input alike")
    p.add_argument("--max-seconds", type=float, default=8.0, help="random crop of longer training utterances")
    p.add_argument("--calibration-items", type=int, default=500, help="training utterances for the statistics")
    p.add_argument("--conv-init", choices=("shift", "copy"), default="shift",
                   help="causal kernels from the teacher's: shift (fold future taps into the centre) or copy as is")
    p.add_argument("--dropout", action="store_true", help="keep the encoder's dropout on while distilling")
    p.add_argument("--batchnorm", action="store_true",
                   help="update batch-norm running statistics while distilling (default: the teacher's, frozen)")
    p.add_argument("--normalization", choices=("fixed", "NA"), default="fixed",
                   help="student front end: fixed per-bin statistics of the training audio, or none (NeMo's NA)")
    p.add_argument("--val-items", type=int, default=16)
    p.add_argument("--report-items", type=int, default=16, help="val utterances streamed for the report")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-resume", dest="resume", action="store_false", help="ignore a saved state and start over")
    return p


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging

    for noisy in ("nemo_logger", "nv_one_logger"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as exc:  # bad arguments, data or a mismatched saved state
        parser.error(str(exc))


if __name__ == "__main__":
    main()
