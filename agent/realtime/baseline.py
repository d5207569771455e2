"""The offline baseline: what Ultravox itself does once the user stops talking.

The whole utterance is featurized and encoded, the prompt (system, template,
audio positions, assistant header) pre-filled in one forward, then the first
token picked: the same model and the same arithmetic as
`UltravoxInference.generate`, timed up to the first token.
"""
from __future__ import annotations

import time
from typing import Optional

import torch

from agent.realtime.llm_state import LLMState


@torch.no_grad()
def offline_first_token(inference, audio, system_prompt: Optional[str] = None, prompt: str = ""):
    """`(first token id, seconds from end of speech to that token)` for `audio`."""
    start = time.perf_counter()
    inputs = inference.prepare(prompt, audio=audio, system_prompt=system_prompt)
    embeds = inference.model.embed_inputs(inputs["input_ids"], inputs.get("input_features"),
                                          inputs.get("feature_lengths"))
    llm = LLMState(inference.model.language_model)
    logits = llm.prefill_embeds(embeds)
    token = int(torch.argmax(logits))
    return token, time.perf_counter() - start
