"""Small Llama-style LLMs and their tokenizers, built locally with no download.

Used by the tests, the benchmarks (random weights of a realistic size) and the
demo model's training, which pre-trains such an LLM on its domain's text.
"""
from __future__ import annotations

from typing import Iterable, Optional

from agent.ultravox.config import AUDIO_PLACEHOLDER

# ChatML: the template renders around the <|audio|> placeholder, so the realtime
# session can split a user turn into "before audio" / "after audio" from it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", AUDIO_PLACEHOLDER]

DEFAULT_CORPUS = [
    "You are a helpful voice assistant. Answer briefly.",
    "Turning on the lights in the kitchen. Turning off the fan in the bedroom.",
    "Timer set for 5 minutes. What is three plus four? 3 plus 4 is 7.",
    "The quick brown fox jumps over the lazy dog. Hello, how can I help you today?",
    "Transcribe the audio. Describe what you hear. Ünïcödé façade, naïve café — 日本語 テスト ✓",
    "system user assistant: the reply starts the moment you stop talking.",
]


def build_tokenizer(corpus: Optional[Iterable[str]] = None, vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on `corpus`, with a ChatML chat template.

    Byte-level: any text (any UTF-8) encodes, and decoding a prefix of the ids can
    end inside a multi-byte character, which the streaming detokenizer must handle.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus or DEFAULT_CORPUS), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", AUDIO_PLACEHOLDER],
        chat_template=CHAT_TEMPLATE,
    )


# name -> (hidden, layers, heads, kv_heads, intermediate)
LLM_SHAPES = {
    "tiny": (64, 2, 4, 2, 128),
    "small": (256, 4, 4, 2, 768),
    # ~150M parameters with a 32k vocabulary: the realistic size for latency benchmarks.
    "bench": (768, 12, 12, 4, 2048),
}


def non_text_ids(tokenizer, vocab_size: int):
    """Ids a random LLM should not emit: beyond the tokenizer, or pieces that do not
    come back as themselves (decode -> encode), except the special tokens."""
    special = set(tokenizer.all_special_ids)
    bad = [t for t in range(len(tokenizer)) if t not in special
           and tokenizer(tokenizer.decode([t]), add_special_tokens=False)["input_ids"] != [t]]
    return bad + list(range(len(tokenizer), vocab_size))


def build_llama(tokenizer, size: str = "tiny", seed: int = 0, vocab_size: Optional[int] = None):
    """A randomly initialized LlamaForCausalLM sized for `tokenizer` (or `vocab_size`)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if size not in LLM_SHAPES:
        raise ValueError(f"unknown LLM size {size!r}; choose one of {sorted(LLM_SHAPES)}")
    hidden, layers, heads, kv_heads, inter = LLM_SHAPES[size]
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=inter,
        max_position_embeddings=4096,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # Untied: a random tied head mostly repeats the last input token (its own
        # embedding scores highest), which would make reply comparisons vacuous.
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # A random head picks ids a trained model would not: past the tokenizer's vocabulary
    # (the benchmark's 32k head), or lone byte pieces that decode to U+FFFD and come back
    # from the tokenizer as three other ids, so every reply would be re-pre-filled whole.
    # Zero rows score 0, below the best real token: random replies stay text that
    # round-trips through the tokenizer, as a trained model's do (the matmul costs the same).
    with torch.no_grad():
        model.lm_head.weight[non_text_ids(tokenizer, config.vocab_size)] = 0
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()
