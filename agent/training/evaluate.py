"""Reply exact-match accuracy of a checkpoint on a manifest, per intent and overall.

    python -m agent.training.evaluate --model agent/assets/demo_model --manifest data/test.jsonl [--streaming] [--limit N]

Offline: `UltravoxInference.generate` on the whole utterance (greedy). With ``--streaming``:
a realtime `Session` over a `StreamingNestEncoder`, fed in packets of 20-40 ms (random sizes,
seeded), greedy; the reply is what the server would send. Held-out device combinations
(``held_out: true`` in the manifest) get their own row besides the device row they belong to.
A reply matches when it equals the expected answer after stripping surrounding whitespace.
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


def exact_match(prediction: str, answer: str) -> bool:
    return prediction.strip() == answer.strip()


def score(records: Iterable[dict]) -> "OrderedDict[str, Dict[str, float]]":
    """records: {"intent", "answer", "prediction", "held_out"?} -> rows {name: {n, correct, accuracy}}
    for each intent (sorted), the held-out device combos, and "overall"."""
    rows: Dict[str, List[int]] = {}
    total = [0, 0]
    for r in records:
        ok = int(exact_match(r["prediction"], r["answer"]))
        names = [r["intent"]] + ([HELD_OUT_ROW] if r.get("held_out") else [])
        for name in names:
            row = rows.setdefault(name, [0, 0])
            row[0] += 1
            row[1] += ok
        total[0] += 1
        total[1] += ok
    out: "OrderedDict[str, Dict[str, float]]" = OrderedDict()
    for name in sorted(rows, key=lambda k: (k == HELD_OUT_ROW, k)):
        n, c = rows[name]
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
                  packet_ms=(20, 40), progress=None) -> List[str]:
    import torch

    from agent.nest.streaming import StreamingNestEncoder
    from agent.realtime.sampling import GenerationSettings
    from agent.realtime.session import Session
    from agent.realtime.single_stream import SingleStream

    streamer = StreamingNestEncoder(inference.model.audio_tower)
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


def evaluate(model_path: str, manifest: str, streaming: bool = False, offline: bool = True, limit: Optional[int] = None,
             system_prompt: Optional[str] = "auto", max_new_tokens: int = 24, show_errors: int = 5,
             out_json: Optional[str] = None) -> "OrderedDict[str, OrderedDict]":
    import torch
    from tqdm import tqdm

    from agent.training.data import load_wave, read_manifest
    from agent.ultravox import UltravoxInference

    items = read_manifest(manifest, limit)
    waves = [load_wave(it["audio_filepath"]) for it in items]
    inference = UltravoxInference(model_path)
    if system_prompt == "auto":
        system_prompt = system_prompt_of(model_path)
    tables: "OrderedDict[str, OrderedDict]" = OrderedDict()
    details = {}
    for path, enabled in (("offline", offline), ("streaming", streaming)):
        if not enabled:
            continue
        start = time.time()
        bar = tqdm(total=len(items), desc=path, file=sys.stderr, mininterval=2.0)
        runner = run_offline if path == "offline" else run_streaming
        with torch.no_grad():  # local: callers (tests, training) keep their grad mode
            preds = runner(inference, items, waves, system_prompt, max_new_tokens, progress=bar)
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder (UltravoxModel.save_pretrained)")
    p.add_argument("--manifest", required=True, help="JSONL manifest with audio_filepath, answer, intent")
    p.add_argument("--streaming", action="store_true", help="also run the streaming Session path")
    p.add_argument("--streaming-only", action="store_true", help="only the streaming path")
    p.add_argument("--limit", type=int, default=None, help="first N items only")
    p.add_argument("--system-prompt", default="auto",
                   help="'auto' (the model's first training system prompt), 'none', or a prompt")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--json", default=None, help="write tables and every prediction here")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(2)
    system = None if args.system_prompt.lower() == "none" else args.system_prompt
    tables = evaluate(args.model, args.manifest, streaming=args.streaming or args.streaming_only,
                      offline=not args.streaming_only, limit=args.limit, system_prompt=system,
                      max_new_tokens=args.max_new_tokens, out_json=args.json)
    print(format_table(tables))


if __name__ == "__main__":
    main()
