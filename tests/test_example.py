"""The seed's example CLI, end to end on local files."""
import os
import re
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    from agent.ultravox.text_models import build_llama, build_tokenizer

    path = tmp_path_factory.mktemp("llm")
    tokenizer = build_tokenizer()
    build_llama(tokenizer, size="tiny", seed=3).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)


def run_example(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "agent.examples.nest_encoder_example", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_example_runs_end_to_end_and_its_saved_checkpoint_reproduces_the_reply(tiny_nest_path, llm_dir, speech_wav, tmp_path):
    from agent.ultravox import UltravoxInference
    from agent.ultravox.inference import load_audio_file

    out = tmp_path / "saved"
    proc = run_example("--nest-model", tiny_nest_path, "--llm-model", llm_dir, "--audio-file", speech_wav,
                       "--layers", "0,2", "--prompt", "What was said?", "--max-new-tokens", "6", "--save", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "selected [0, 2]" in proc.stdout
    assert "layer outputs [K,B,T,D] = [2, 1," in proc.stdout
    reply = re.search(r"reply \([0-9.]+ s\): (.*)$", proc.stdout, re.M).group(1)
    audio, rate = load_audio_file(speech_wav)
    again = UltravoxInference(str(out)).generate("What was said?", audio=audio, sample_rate=rate, max_new_tokens=6)
    assert reply == repr(again)


def test_example_reports_invalid_layers_clearly(tiny_nest_path, llm_dir, speech_wav):
    proc = run_example("--nest-model", tiny_nest_path, "--llm-model", llm_dir, "--audio-file", speech_wav, "--layers", "9")
    assert proc.returncode == 2
    assert "valid indices are 0..2" in proc.stderr
