"""Reply exact-match accuracy of a checkpoint on a manifest, per intent and overall.

    python -m agent.training.evaluate --model agent/assets/demo_model --manifest data/test.jsonl [--streaming] [--limit N]
        [--chunk-ms 80,160,320,640,1280]
    python -m agent.training.evaluate --model M --manifest data/eot/test.jsonl --eot [--chunk-ms ...]

Offline: `UltravoxInference.generate` on the whole utterance (greedy). With ``--streaming``:
a realtime `Session` over a `StreamingNestEncoder`, fed in packets of 20-40 ms (random sizes,
seeded), greedy; the reply is what the server would send. Held-out device combinations
(``held_out: true`` in the manifest) get their own row besides the device row they belong to.
A reply matches when it equals the expected answer after stripping surrounding whitespace.
Out-of-domain requests get a row for their held-out phrasings, and the in-domain rows are also
summed ("in-domain overall") with the share of them answered by the decline. Cut turns
(``done: false``) are skipped here; ``--eot`` scores the end-of-turn decision on them instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

HELD_OUT_ROW = "device (held-out combos)"
OOD_HELD_OUT_ROW = "out_of_domain (held-out phrasings)"
IN_DOMAIN_ROW = "in-domain overall"
DECLINED_ROW = "in-domain wrongly declined (lower is better)"
_HELD_OUT_ROWS = {"device": HELD_OUT_ROW, "out_of_domain": OOD_HELD_OUT_ROW}


def exact_match(prediction: str, answer: str) -> bool:
    return prediction.strip() == answer.strip()


def score(records: Iterable[dict]) -> "OrderedDict[str, Dict[str, float]]":
    """records: {"intent", "answer", "prediction", "held_out"?} -> rows {name: {n, correct, accuracy}}
    for each intent (sorted), the held-out device combos, and "overall". With out-of-domain
    records also: their held-out phrasings, the in-domain rows together, and the share of
    in-domain requests answered with the decline (its "correct" counts the declined ones)."""
    from agent.training.domain import DECLINE, OUT_OF_DOMAIN

    rows: Dict[str, List[int]] = {}
    total = [0, 0]
    in_domain = [0, 0]
    declined = [0, 0]
    any_ood = False
    for r in records:
        ok = int(exact_match(r["prediction"], r["answer"]))
        held_row = _HELD_OUT_ROWS.get(r["intent"], f"{r['intent']} (held out)")
        names = [r["intent"]] + ([held_row] if r.get("held_out") else [])
        for name in names:
            row = rows.setdefault(name, [0, 0])
            row[0] += 1
            row[1] += ok
        total[0] += 1
        total[1] += ok
        if r["intent"] == OUT_OF_DOMAIN:
            any_ood = True
        else:
            in_domain[0] += 1
            in_domain[1] += ok
            declined[0] += 1
            declined[1] += int(exact_match(r["prediction"], DECLINE))
    out: "OrderedDict[str, Dict[str, float]]" = OrderedDict()
    held_names = set(_HELD_OUT_ROWS.values())
    for name in sorted(rows, key=lambda k: (k in held_names or k.endswith("(held out)"), k)):
        n, c = rows[name]
        out[name] = {"n": n, "correct": c, "accuracy": c / n if n else 0.0}
    if any_ood:
        for name, (n, c) in ((IN_DOMAIN_ROW, in_domain), (DECLINED_ROW, declined)):
            out[name] = {"n": n, "correct": c, "accuracy": c / n if n else 0.0}
    out["overall"] = {"n": total[0], "correct": total[1], "accuracy": total[1] / total[0] if total[0] else 0.0}
    return out


def format_table(tables: "OrderedDict[str, OrderedDict]") -> str:
    """Markdown table: one row per intent, one column per path (offline / streaming)."""
    paths = list(tables)
    names = list(next(iter(tables.values())))
    lines = ["| intent | n | " + " | ".join(paths) + " |", "|---|---|" + "---|" * len(paths)]
    for name in names:
        cells = []
        for p in paths:
            row = tables[p][name]
            cells.append(f"{100 * row['accuracy']:.1f}% ({row['correct']}/{row['n']})")
        lines.append(f"| {name} | {tables[paths[0]][name]['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def system_prompt_of(model_path: str) -> Optional[str]:
    """The first system prompt the model was trained with (None: none), from its training config."""
    path = os.path.join(model_path, "training_config.yaml")
    if not os.path.isfile(path):
        return None
    import yaml

    with open(path) as f:
        prompts = (yaml.safe_load(f) or {}).get("prompt", {}).get("system_prompts") or [None]
    return prompts[0]


def run_offline(inference, items: Sequence[dict], waves, system_prompt, max_new_tokens: int, progress=None) -> List[str]:
    preds = []
    for item, wave in zip(items, waves):
        preds.append(inference.generate("", audio=wave, system_prompt=system_prompt, max_new_tokens=max_new_tokens))
        if progress:
            progress.update(1)
    return preds


def run_streaming(inference, items: Sequence[dict], waves, system_prompt, max_new_tokens: int, seed: int = 0,
                  packet_ms=(20, 40), progress=None, chunk_ms: Optional[int] = None) -> List[str]:
    """`chunk_ms`: the encoder's streaming chunk (None: the model's default), with its trained
    left context, as `serve.py --chunk-ms` sets it up."""
    import torch

    from agent.nest.streaming import StreamingNestEncoder
    from agent.realtime.sampling import GenerationSettings
    from agent.realtime.session import Session
    from agent.realtime.single_stream import SingleStream

    if chunk_ms is None:
        streamer = StreamingNestEncoder(inference.model.audio_tower)
    else:
        chunk, left = streaming_context(inference.model.audio_tower, chunk_ms)
        streamer = StreamingNestEncoder(inference.model.audio_tower, chunk_frames=chunk, left_context_frames=left)
        if not streamer.report.get("trained_for_this_context"):
            print(f"warning: chunk {chunk_ms} ms is not a context the encoder was trained for", file=sys.stderr)
    rng = np.random.default_rng(seed)
    preds = []
    for wave in waves:
        session = Session(inference.model, inference.tokenizer, system_prompt=system_prompt,
                          settings=GenerationSettings(temperature=0.0, max_new_tokens=max_new_tokens))
        stream = SingleStream(session, streamer)
        wave_t = torch.from_numpy(np.asarray(wave, dtype=np.float32))
        i = 0
        while i < wave_t.numel():
            n = int(16 * rng.integers(packet_ms[0], packet_ms[1] + 1))
            stream.feed(wave_t[i:i + n])
            i += n
        stream.end_turn()
        for _ in session.reply():
            pass
        preds.append(session.last_reply.text)
        if progress:
            progress.update(1)
    return preds


def streaming_context(audio_tower, chunk_ms: int):
    """(chunk frames, left context frames) for a chunk of `chunk_ms`, as serve.py picks them: the
    trained left context rounded down to a multiple of the chunk."""
    if chunk_ms % 80:
        raise ValueError(f"chunk {chunk_ms} ms is not a multiple of 80 ms")
    chunk = chunk_ms // 80
    trained_left = audio_tower.encoder.att_context_size[0]
    left = max(chunk, (trained_left if trained_left > 0 else 64) // chunk * chunk)
    return chunk, left


def end_of_turn_probs(model, tokenizer, items: Sequence[dict], system_prompt: Optional[str],
                      chunk_ms: Optional[int] = None, batch_size: int = 16) -> List[float]:
    """p_done of each item: softmax(logits at the last audio position)[the token after the audio in
    the prompt (ChatML: <|im_end|>)], offline (the whole utterance; with `chunk_ms`, the encoder's
    attention set to that streaming chunk, which streaming reproduces exactly)."""
    import torch

    from agent.training.data import Collator, ManifestDataset, end_of_turn_log_probs
    from agent.training.train import make_processor

    processor = make_processor(model, tokenizer)
    collator = Collator(processor, [system_prompt], augment=None, seed=0)
    dataset = ManifestDataset(list(items))
    encoder = model.audio_tower.encoder
    before = list(encoder.att_context_size)
    if chunk_ms is not None:
        chunk, left = streaming_context(model.audio_tower, chunk_ms)
        encoder.set_default_att_context_size([left, chunk - 1])
    end_token = tokenizer.convert_tokens_to_ids("<|im_end|>")
    out: List[float] = []
    model.eval()
    try:
        with torch.no_grad():
            for s in range(0, len(dataset), batch_size):
                idx = list(range(s, min(len(dataset), s + batch_size)))
                batch = collator(dataset, idx, train=False, system_prompts=[system_prompt] * len(idx))
                inputs = {k: v for k, v in batch.inputs.items() if k != "labels"}
                logits = model(**inputs).logits
                log_done, _, end_ids = end_of_turn_log_probs(logits, inputs["input_ids"], processor.audio_token_id)
                if not bool((end_ids == end_token).all()):
                    raise RuntimeError("the token after the audio is not <|im_end|>: the end-of-turn contract changed")
                out += log_done.exp().tolist()
    finally:
        encoder.set_default_att_context_size(before)
    return out


def auc(pos: Sequence[float], neg: Sequence[float]) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    if not pos or not neg:
        return float("nan")
    neg_sorted = np.sort(np.asarray(neg))
    wins = 0.0
    for p in pos:
        lo = np.searchsorted(neg_sorted, p, side="left")
        hi = np.searchsorted(neg_sorted, p, side="right")
        wins += lo + 0.5 * (hi - lo)
    return float(wins / (len(pos) * len(neg)))


def end_of_turn_report(items: Sequence[dict], probs: Sequence[float], threshold: float = 0.5) -> Dict[str, float]:
    """Complete (done) vs cut turns: counts, mean / median p_done, accuracy at `threshold`, AUC."""
    from agent.training.data import turn_done

    done = [p for it, p in zip(items, probs) if turn_done(it)]
    cut = [p for it, p in zip(items, probs) if not turn_done(it)]
    correct = sum(p > threshold for p in done) + sum(p <= threshold for p in cut)
    return {"n_done": len(done), "n_cut": len(cut),
            "mean_p_done_complete": float(np.mean(done)) if done else float("nan"),
            "mean_p_done_cut": float(np.mean(cut)) if cut else float("nan"),
            "median_p_done_complete": float(np.median(done)) if done else float("nan"),
            "median_p_done_cut": float(np.median(cut)) if cut else float("nan"),
            "complete_above": sum(p > threshold for p in done) / max(1, len(done)),
            "cut_below": sum(p <= threshold for p in cut) / max(1, len(cut)),
            "accuracy": correct / max(1, len(done) + len(cut)), "auc": auc(done, cut)}


def format_eot_table(reports: "OrderedDict[str, Dict[str, float]]") -> str:
    lines = ["| encoder context | complete turns | cut turns | mean p_done complete / cut | complete > 0.5 | cut <= 0.5 | accuracy at 0.5 | AUC |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in reports.items():
        lines.append(f"| {name} | {r['n_done']} | {r['n_cut']} | {r['mean_p_done_complete']:.3f} / {r['mean_p_done_cut']:.3f} | "
                     f"{100 * r['complete_above']:.1f}% | {100 * r['cut_below']:.1f}% | {100 * r['accuracy']:.1f}% | {r['auc']:.3f} |")
    return "\n".join(lines)


def evaluate(model_path: str, manifest: str, streaming: bool = False, offline: bool = True, limit: Optional[int] = None,
             system_prompt: Optional[str] = "auto", max_new_tokens: int = 64, show_errors: int = 5,
             out_json: Optional[str] = None, chunk_ms: Sequence[int] = ()) -> "OrderedDict[str, OrderedDict]":
    import torch
    from tqdm import tqdm

    from agent.training.data import load_wave, read_manifest
    from agent.ultravox import UltravoxInference

    from agent.training.data import turn_done

    items = [it for it in read_manifest(manifest, limit) if turn_done(it)]  # cut turns: see --eot
    waves = [load_wave(it["audio_filepath"]) for it in items]
    inference = UltravoxInference(model_path)
    if system_prompt == "auto":
        system_prompt = system_prompt_of(model_path)
    tables: "OrderedDict[str, OrderedDict]" = OrderedDict()
    details = {}
    runs = [("offline", offline, None), ("streaming", streaming, None)]
    runs += [(f"streaming {c} ms", True, int(c)) for c in chunk_ms]
    for path, enabled, chunk in runs:
        if not enabled:
            continue
        start = time.time()
        bar = tqdm(total=len(items), desc=path, file=sys.stderr, mininterval=2.0)
        with torch.no_grad():  # local: callers (tests, training) keep their grad mode
            if path == "offline":
                preds = run_offline(inference, items, waves, system_prompt, max_new_tokens, progress=bar)
            else:
                preds = run_streaming(inference, items, waves, system_prompt, max_new_tokens, progress=bar,
                                      chunk_ms=chunk)
        bar.close()
        records = [dict(intent=it["intent"], answer=it["answer"], prediction=p, held_out=it.get("held_out", False),
                        voice=it.get("voice"), text=it.get("text")) for it, p in zip(items, preds)]
        tables[path] = score(records)
        details[path] = records
        errors = [r for r in records if not exact_match(r["prediction"], r["answer"])]
        print(f"{path}: {len(items)} utterances in {time.time() - start:.1f} s; {len(errors)} errors", flush=True)
        for r in errors[:show_errors]:
            print(f"  [{r['voice']}] {r['text']!r}: expected {r['answer']!r}, got {r['prediction']!r}")
    if out_json:
        with open(out_json, "w") as f:
            json.dump({"tables": tables, "records": details}, f, indent=1)
    return tables


def evaluate_eot(model_path: str, manifest: str, system_prompt: Optional[str] = "auto", chunk_ms: Sequence[int] = (),
                 limit: Optional[int] = None, out_json: Optional[str] = None) -> "OrderedDict[str, Dict[str, float]]":
    """The end-of-turn decision on a manifest with complete and cut turns (`synth --cut-share`)."""
    from agent.training.data import read_manifest
    from agent.ultravox import UltravoxInference

    items = read_manifest(manifest, limit)
    inference = UltravoxInference(model_path)
    if system_prompt == "auto":
        system_prompt = system_prompt_of(model_path)
    reports: "OrderedDict[str, Dict[str, float]]" = OrderedDict()
    probs_by = {}
    for chunk in [None] + list(chunk_ms):
        name = "default (offline)" if chunk is None else f"{chunk} ms chunks"
        probs = end_of_turn_probs(inference.model, inference.tokenizer, items, system_prompt, chunk)
        reports[name] = end_of_turn_report(items, probs)
        probs_by[name] = probs
    if out_json:
        with open(out_json, "w") as f:
            json.dump({"reports": reports, "items": [{"text": it["text"], "done": it.get("done", True),
                                                      "intent": it["intent"], "voice": it.get("voice"),
                                                      **{k: v[i] for k, v in probs_by.items()}}
                                                     for i, it in enumerate(items)]}, f, indent=1)
    return reports


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder (UltravoxModel.save_pretrained)")
    p.add_argument("--manifest", required=True, help="JSONL manifest with audio_filepath, answer, intent")
    p.add_argument("--streaming", action="store_true", help="also run the streaming Session path")
    p.add_argument("--streaming-only", action="store_true", help="only the streaming path")
    p.add_argument("--limit", type=int, default=None, help="first N items only")
    p.add_argument("--system-prompt", default="auto",
                   help="'auto' (the model's first training system prompt), 'none', or a prompt")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="the demo's decline is 46 tokens with its tokenizer (the server allows 64)")
    p.add_argument("--chunk-ms", default="",
                   help="also stream through a Session at each of these encoder chunks, e.g. 80,160,320,640,1280")
    p.add_argument("--eot", action="store_true",
                   help="the end-of-turn decision instead: p_done (softmax at the last audio position, <|im_end|>) "
                        "of complete vs cut turns (manifest 'done'), offline, at the default context and each --chunk-ms")
    p.add_argument("--json", default=None, help="write tables and every prediction here")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(2)
    system = None if args.system_prompt.lower() == "none" else args.system_prompt
    chunks = [int(c) for c in args.chunk_ms.split(",") if c.strip()]
    if args.eot:
        print(format_eot_table(evaluate_eot(args.model, args.manifest, system, chunks, args.limit, args.json)))
        return
    tables = evaluate(args.model, args.manifest, streaming=args.streaming or args.streaming_only,
                      offline=not args.streaming_only, limit=args.limit, system_prompt=system,
                      max_new_tokens=args.max_new_tokens, out_json=args.json, chunk_ms=chunks)
    print(format_table(tables))


if __name__ == "__main__":
    main()
