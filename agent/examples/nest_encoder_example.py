"""NEST encoder + Ultravox example: select encoder layers, fuse them, ask an LLM.

    python -m agent.examples.nest_encoder_example \
        --nest-model nvidia/ssl_en_nest_large_v1.0 (or a local .nemo) \
        --llm-model /path/to/llm-folder (or a Hugging Face id) \
        --audio-file speech.wav --layers last|all|0,1,2

With a fresh (untrained) projector the reply is not meaningful: the example
shows the pipeline. Train with `python -m agent.training.train`, or pass
--checkpoint to use a trained Ultravox checkpoint instead.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nest-model", help="NEST .nemo file, NeMo pretrained name, or NeMo .yaml config")
    p.add_argument("--llm-model", help="causal LLM: local folder or Hugging Face id (with its tokenizer)")
    p.add_argument("--checkpoint", help="a saved Ultravox+NEST checkpoint folder (instead of the two above)")
    p.add_argument("--audio-file", required=True, help="speech file (any rate; resampled to 16 kHz)")
    p.add_argument("--layers", default="last", help="'last', 'all', or indices such as '0,1,2'")
    p.add_argument("--prompt", default="Listen to the audio and answer.")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--stack-factor", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--save", help="also write a self-contained checkpoint folder here")
    args = p.parse_args(argv)
    if not args.checkpoint and not (args.nest_model and args.llm_model):
        p.error("give --nest-model and --llm-model, or --checkpoint")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agent.nest import NestEncoder
    from agent.ultravox import UltravoxConfig, UltravoxInference, UltravoxModel
    from agent.ultravox.inference import load_audio_file, resolve_dtype

    dtype = resolve_dtype(args.dtype)
    t0 = time.perf_counter()
    if args.checkpoint:
        inference = UltravoxInference(args.checkpoint, device=args.device, data_type=dtype)
        encoder = inference.model.audio_tower
        encoder.set_layers(encoder.layer_indices)  # the checkpoint decides the layers
    else:
        print(f"loading NEST encoder {args.nest_model} (layers: {args.layers}) ...", flush=True)
        encoder = NestEncoder(args.nest_model, torch_dtype=dtype, layer=args.layers)
        print(f"loading LLM {args.llm_model} ...", flush=True)
        tokenizer = AutoTokenizer.from_pretrained(args.llm_model)
        llm = AutoModelForCausalLM.from_pretrained(args.llm_model, dtype=dtype)
        config = UltravoxConfig(
            audio_config={"model_type": "nest", "_name_or_path": args.nest_model, "layers": args.layers},
            text_model_id=args.llm_model,
            text_config=llm.config,
            stack_factor=args.stack_factor,
        )
        model = UltravoxModel(config, audio_tower=encoder, language_model=llm, dtype=dtype)
        inference = UltravoxInference.from_model(model, tokenizer, device=args.device)
    print(f"loaded in {time.perf_counter() - t0:.1f} s")

    audio, rate = load_audio_file(args.audio_file)
    print(f"audio: {args.audio_file}, {len(audio) / rate:.2f} s at {rate} Hz")
    out = encoder.encode_audio(inference.processor.audio_processor.prepare_waveforms(audio, rate)[0])
    print(f"encoder: {encoder.num_layers} layers of width {encoder.hidden_size}; selected {out.layer_indices}")
    print(f"  frames: {int(out.lengths[0])} (80 ms each); layer outputs [K,B,T,D] = {list(out.hidden_states.shape)}")
    for k, idx in enumerate(out.layer_indices):
        h = out.hidden_states[k, 0, : int(out.lengths[0])].float()
        print(f"  layer {idx:2d}: mean {h.mean():+.4f}  std {h.std():.4f}")
    weights = inference.model.projector.fusion_weights().tolist()
    print(f"fusion weights: {[round(w, 4) for w in weights]}")
    n_tokens = inference.processor.audio_token_count(len(inference.processor.audio_processor.prepare_waveforms(audio, rate)[0]))
    print(f"audio tokens in the prompt: {n_tokens} (stack factor {inference.model.config.stack_factor})")

    t1 = time.perf_counter()
    reply = inference.generate(args.prompt, audio=audio, sample_rate=rate, max_new_tokens=args.max_new_tokens)
    print(f"reply ({time.perf_counter() - t1:.2f} s): {reply!r}")
    if args.save:
        inference.model.save_pretrained(args.save, tokenizer=inference.tokenizer)
        print(f"saved a self-contained checkpoint to {args.save}")
    return 0


def cli() -> int:
    try:
        return main()
    except (ValueError, RuntimeError, FileNotFoundError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
