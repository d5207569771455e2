"""Realtime session building blocks: chat-template segments, incremental
detokenization, sampling, per-conversation LLM state, voice activity and turn
detection.

Import the submodules directly (`from agent.realtime.vad import SileroVad`);
this package imports nothing itself, so importing it stays cheap.
"""
