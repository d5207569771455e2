"""Build a random-weight, self-contained Ultravox+NEST checkpoint.

    python -m agent.ultravox.build --out /tmp/ckpt [--nest tiny|large] [--llm tiny|small|bench]

Tests use the tiny one; benchmarks use `--nest large --llm bench` (NEST-L shape,
~150M-parameter LLM). Random weights: useful for plumbing and timing, not for answers.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from typing import Optional, Union

import torch

from agent.nest.random_model import build_random_nest
from agent.ultravox.config import UltravoxConfig
from agent.ultravox.model import UltravoxModel
from agent.ultravox.text_models import build_llama, build_tokenizer


def build_random_checkpoint(
    out_dir: str,
    nest: str = "tiny",
    llm: str = "tiny",
    streaming: bool = False,
    layers: Union[str, list] = "all",
    stack_factor: int = 8,
    projector_hidden_size: Optional[int] = None,
    audio_tower_context_length: Optional[int] = None,
    seed: int = 0,
    vocab_size: int = 512,
) -> str:
    tokenizer = build_tokenizer(vocab_size=vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        nemo_path = build_random_nest(os.path.join(tmp, "nest.nemo"), shape=nest, streaming=streaming, seed=seed)
        language_model = build_llama(tokenizer, size=llm, seed=seed)
        config = UltravoxConfig(
            audio_config={"model_type": "nest", "_name_or_path": nemo_path, "layers": layers},
            text_config=language_model.config,
            stack_factor=stack_factor,
            projector_hidden_size=projector_hidden_size,
            audio_tower_context_length=audio_tower_context_length,
            audio_token_index=tokenizer.convert_tokens_to_ids("<|audio|>"),
        )
        torch.manual_seed(seed + 1)
        model = UltravoxModel(config, language_model=language_model)
        with torch.no_grad():  # non-uniform fusion weights, so layer fusion is visible
            model.projector.layer_logits.copy_(torch.linspace(-1.0, 1.0, model.projector.layer_logits.numel()))
        model.save_pretrained(out_dir, tokenizer=tokenizer)
    return out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    parser.add_argument("--nest", default="tiny", choices=["tiny", "large"])
    parser.add_argument("--llm", default="tiny", choices=["tiny", "small", "bench"])
    parser.add_argument("--streaming", action="store_true", help="cache-aware (chunked_limited, causal) encoder")
    parser.add_argument("--layers", default="all")
    parser.add_argument("--stack-factor", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"building a random checkpoint (NEST {args.nest}, LLM {args.llm}) in {args.out} ...", flush=True)
    build_random_checkpoint(args.out, nest=args.nest, llm=args.llm, streaming=args.streaming, layers=args.layers,
                            stack_factor=args.stack_factor, seed=args.seed)
    print(f"done: {args.out}")


if __name__ == "__main__":
    main()
