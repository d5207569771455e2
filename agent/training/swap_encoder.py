"""Put a streamified NEST encoder into an Ultravox checkpoint trained on its full-context teacher.

    python -m agent.training.swap_encoder --checkpoint full-ckpt --encoder student.nemo --out streaming-ckpt

`agent.training.streamify` distills the teacher's per-layer features into the student, so
the student stays in the teacher's feature space and the projector and LLM trained on the
teacher can take it as is (no retraining). The new checkpoint is self-contained and
`serve.py --model streaming-ckpt` streams it exactly. What the swap costs in accuracy:

    python -m agent.training.evaluate --model full-ckpt --manifest test.jsonl
    python -m agent.training.evaluate --model streaming-ckpt --manifest test.jsonl --streaming
"""
from __future__ import annotations

import argparse
import os


def swap_encoder(checkpoint: str, encoder_path: str, out: str) -> str:
    """Write `out`: `checkpoint` with its audio tower replaced by `encoder_path` (same
    width, depth and layer selection). Returns `out`."""
    from transformers import AutoTokenizer

    from agent.nest import NestEncoder
    from agent.nest.config import NestConfig
    from agent.nest.streamable import not_streamable_reasons
    from agent.ultravox.model import UltravoxModel

    if os.path.abspath(out) == os.path.abspath(checkpoint):
        raise ValueError("--out must differ from --checkpoint (the original is kept)")
    model = UltravoxModel.from_pretrained(checkpoint)
    old = model.audio_tower
    new = NestEncoder(encoder_path, layer=list(old.layer_indices))
    if (new.hidden_size, new.num_layers) != (old.hidden_size, old.num_layers):
        raise ValueError(f"{encoder_path} is d_model {new.hidden_size} x {new.num_layers} layers, the checkpoint's "
                         f"encoder is {old.hidden_size} x {old.num_layers}: not the same architecture")
    reasons = not_streamable_reasons(new)
    if reasons:
        raise ValueError(f"{encoder_path} does not stream exactly ({', '.join(reasons)}): streamify it first")
    model.audio_tower = new
    model.config.audio_config = NestConfig.from_encoder(new)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model.save_pretrained(out, tokenizer=tokenizer)
    training_config = os.path.join(checkpoint, "training_config.yaml")  # evaluate reads its system prompts
    if os.path.isfile(training_config):
        import shutil

        shutil.copy(training_config, os.path.join(out, "training_config.yaml"))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="Ultravox checkpoint folder (trained on the teacher)")
    p.add_argument("--encoder", required=True, help="streamified .nemo (python -m agent.training.streamify)")
    p.add_argument("--out", required=True, help="new checkpoint folder")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        swap_encoder(args.checkpoint, args.encoder, args.out)
    except (ValueError, FileNotFoundError) as exc:
        p.error(str(exc))
    print(f"wrote {args.out}: {args.checkpoint} with the audio tower from {args.encoder}")


if __name__ == "__main__":
    main()
