"""Streamify: fixed normalization, a full-context tiny NEST distilled into a cache-aware one,
exact streaming of the result, resuming, the Ultravox swap and serve.py's refusal / --approximate."""
import json
import os
import warnings

import numpy as np
import pytest
import torch

from agent.nest import NestEncoder
from agent.nest.configs import nest_model_config
from agent.nest.incremental_mel import IncrementalMel
from agent.nest.loading import _model_from_config
from agent.nest.normalization import (fixed_normalize_config, install_fixed_normalization,
                                      measure_mel_statistics, raw_preprocessor)
from agent.nest.random_model import build_random_nest
from agent.nest.streaming import StreamingNestEncoder

SR = 16000
TRAIN_TEXTS = ["turn on the lights in the kitchen", "set a timer for five minutes", "what is seven times eight",
               "switch off the fan in the bedroom", "open the garage door please", "how much is twelve plus nine",
               "dim the lamp in the living room", "start the coffee machine", "what time is it now",
               "close the blinds in the office"]
TRAIN_VOICES = ["en-us", "en-gb-x-rp", "en-us+f2"]
VAL_TEXTS = ["turn off the heater in the hall", "set an alarm for seven thirty", "what is four plus three"]


def write_manifest(folder, texts, voices):
    from conftest import synthesize

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "manifest.jsonl")
    with open(path, "w") as f:
        for i, text in enumerate(texts):
            wav = synthesize(text, os.path.join(folder, f"{i:03d}.wav"), voice=voices[i % len(voices)],
                             speed=140 + 15 * (i % 4))
            import soundfile as sf

            f.write(json.dumps({"audio_filepath": wav, "duration": sf.info(wav).duration, "text": text}) + "\n")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("streamify_data")
    # Validation speech: other sentences, another voice, never trained on.
    return (write_manifest(str(root / "train"), TRAIN_TEXTS, TRAIN_VOICES),
            write_manifest(str(root / "val"), VAL_TEXTS, ["en-us+m3"]))


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    """A full-context tiny NEST (regular attention, symmetric convolutions, per_feature)."""
    return build_random_nest(str(tmp_path_factory.mktemp("teacher") / "teacher.nemo"), shape="tiny", seed=5)


def run_streamify(teacher, out, data, *extra):
    from agent.training.streamify import build_parser, run

    train, val = data
    args = build_parser().parse_args(["--nest-model", teacher, "--out", out, "--manifest", train,
                                      "--val-manifest", val, "--batch-size", "4", "--lr", "3e-4",
                                      "--warmup-steps", "5", "--report-items", "3", "--threads", "1", *extra])
    lines = []
    report = run(args, log=lines.append)
    return report, lines


@pytest.fixture(scope="module")
def streamified(tmp_path_factory, teacher_path, data):
    out = str(tmp_path_factory.mktemp("student") / "student.nemo")
    report, lines = run_streamify(teacher_path, out, data, "--chunks-ms", "160,320", "--steps", "30",
                                  "--eval-every", "30")
    return out, report, lines


def waves_of(manifest):
    from agent.training.data import load_wave, read_manifest

    return [load_wave(item["audio_filepath"]) for item in read_manifest(manifest)]


# -- fixed normalization --------------------------------------------------------------

def test_fixed_normalization_matches_per_feature_statistics(data):
    model = _model_from_config(nest_model_config("tiny")).eval()  # per_feature front end
    pre = model.preprocessor
    waves = waves_of(data[0])[:4]
    # One calibration utterance: its fixed statistics are its per_feature statistics.
    mean, std, frames = measure_mel_statistics(pre, waves[:1])
    assert frames == len(waves[0]) // 160
    fixed = _model_from_config(nest_model_config("tiny", normalize=fixed_normalize_config(mean, std))).eval()
    signal, length = torch.from_numpy(waves[0])[None], torch.tensor([len(waves[0])])
    per_feature, n = pre(input_signal=signal, length=length)
    nemo_fixed, _ = fixed.preprocessor(input_signal=signal, length=length)  # NeMo's own fixed path, batch 1
    assert install_fixed_normalization(fixed.preprocessor)
    ours, _ = fixed.preprocessor(input_signal=signal, length=length)
    assert (nemo_fixed - per_feature).abs().max() < 1e-4
    assert (ours - nemo_fixed).abs().max() < 1e-6
    # Several utterances: pooled statistics; normalized calibration frames have mean 0, std 1 per bin.
    mean, std, frames = measure_mel_statistics(pre, waves)
    raw = raw_preprocessor(pre)
    pooled = torch.cat([raw(input_signal=torch.from_numpy(w)[None], length=torch.tensor([len(w)]))[0][0, :, : len(w) // 160]
                        for w in waves], dim=1)
    assert frames == pooled.shape[1]
    assert torch.allclose(mean, pooled.mean(1), atol=1e-4) and torch.allclose(std, pooled.std(1) + 1e-5, atol=1e-4)
    assert std.min() > 0.1 and mean.std() > 0.1  # real, bin-dependent statistics, not 0/1
    fixed = _model_from_config(nest_model_config("tiny", normalize=fixed_normalize_config(mean, std))).eval()
    install_fixed_normalization(fixed.preprocessor)
    # A padded batch: each item equals itself alone (NeMo's fixed path cannot take a batch > 1).
    lengths = torch.tensor([len(w) for w in waves[:2]])
    batch = torch.zeros(2, int(lengths.max()))
    for i, w in enumerate(waves[:2]):
        batch[i, : len(w)] = torch.from_numpy(w)
    feats, feat_len = fixed.preprocessor(input_signal=batch, length=lengths)
    normalized = []
    for i, w in enumerate(waves[:2]):
        alone, _ = fixed.preprocessor(input_signal=torch.from_numpy(w)[None], length=lengths[i: i + 1])
        k = int(feat_len[i])
        assert (feats[i, :, :k] - alone[0, :, :k]).abs().max() < 1e-5
        assert feats[i, :, k:].abs().max() == 0  # padding stays NeMo's pad value
        normalized.append(alone[0, :, :k])
    normalized = torch.cat(normalized + [fixed.preprocessor(input_signal=torch.from_numpy(w)[None],
                                                             length=torch.tensor([len(w)]))[0][0, :, : len(w) // 160]
                                         for w in waves[2:]], dim=1)
    assert normalized.mean(1).abs().max() < 1e-3 and (normalized.std(1) - 1).abs().max() < 1e-3


def test_incremental_mel_streams_fixed_normalization_exactly(data):
    waves = waves_of(data[1])
    pre = _model_from_config(nest_model_config("tiny")).preprocessor
    mean, std, _ = measure_mel_statistics(pre, waves)
    fixed = _model_from_config(nest_model_config("tiny", normalize=fixed_normalize_config(mean, std))).preprocessor
    mel = IncrementalMel(fixed)  # exact: no approximate flag needed
    assert mel.exact
    rng = np.random.default_rng(0)
    for w in waves:
        audio = torch.from_numpy(w)
        ref, n = fixed.eval()(input_signal=audio[None], length=torch.tensor([audio.numel()]))
        state, parts, i = mel.init_state(), [], 0
        while i < audio.numel():
            k = int(rng.integers(1, 1200))
            state, m = mel.push(state, audio[i:i + k])
            parts.append(m)
            i += k
        state, m = mel.push(state, None, final=True)
        got = torch.cat(parts + [m], dim=1)
        assert got.shape[1] == int(n[0])
        assert (got - ref[0, :, : int(n[0])]).abs().max() < 1e-4


# -- streamify --------------------------------------------------------------------------

def test_streamify_lifts_streamed_cosine_above_naive_streaming(streamified):
    out, report, lines = streamified
    assert os.path.isfile(out)
    from agent.training.streamify import report_path, state_dir

    with open(report_path(out)) as f:
        on_disk = json.load(f)
    assert on_disk["rows"] == report["rows"] and report["steps"] == 30
    assert [r["chunk_ms"] for r in report["rows"]] == [160, 320]
    for row in report["rows"]:
        assert row["layers"] == [0, 1, 2] and row["frames"] > 50
        for naive, student in zip(row["teacher_naive_cos"], row["student_cos"]):
            assert student > naive + 0.01, row  # on val audio (other voice and sentences)
        assert row["student_stream_vs_offline_max_abs"] <= 1e-4
        assert row["student_trained_for_chunk"]
    # Training moved the student towards the teacher on the val audio (the chunked offline
    # forward, equal to streaming): closer in L1 and in cosine than the initialised student.
    records = [json.loads(line) for line in open(os.path.join(state_dir(out), "metrics.jsonl"))]
    assert records[0]["step"] == 0 and records[-1]["step"] == 30
    for chunk in ("160", "320"):
        assert records[-1]["val_rel_l1"][chunk] < 0.98 * records[0]["val_rel_l1"][chunk], (records[0], records[-1])
        assert records[-1]["val_cos"][chunk] > records[0]["val_cos"][chunk], (records[0], records[-1])
    assert any("| 160 |" in line for line in lines[-3:]) or any("| 160 |" in line for line in lines)


def test_student_is_cache_aware_nemo_and_loads_through_nemo(streamified):
    from nemo.collections.asr.models.ssl_models import SpeechEncDecSelfSupervisedModel

    out = streamified[0]
    model = SpeechEncDecSelfSupervisedModel.restore_from(out, map_location="cpu")
    enc = model.cfg.encoder
    assert enc.att_context_style == "chunked_limited"
    assert [list(a) for a in enc.att_context_size] == [[64, 1], [64, 3]]
    assert list(enc.att_context_probs) == [0.5, 0.5]
    assert enc.conv_context_size == "causal" and not enc.causal_downsampling
    assert len(model.cfg.preprocessor.normalize.fixed_mean) == 80
    student = NestEncoder(out, layer="all")
    from agent.nest.streamable import not_streamable_reasons

    assert not_streamable_reasons(student) == []
    teacher = NestEncoder(streamified[1]["teacher"], layer="all")
    assert len(not_streamable_reasons(teacher)) == 3
    # the student is the teacher's weights, moved: the attention projections stay close
    a = teacher.encoder.layers[0].self_attn.linear_q.weight
    b = student.encoder.layers[0].self_attn.linear_q.weight
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.9


@pytest.mark.parametrize("chunk", [2, 4])
def test_student_streams_exactly_three_batched_streams(streamified, data, chunk):
    import copy

    student = NestEncoder(streamified[0], layer="all")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a trained chunk: no approximation, no warning
        streamer = StreamingNestEncoder(student, chunk_frames=chunk, left_context_frames=64)
    offline = copy.deepcopy(student)
    offline.encoder.set_default_att_context_size([64, chunk - 1])
    waves = [torch.from_numpy(w) for w in waves_of(data[1])]
    rng = np.random.default_rng(chunk)
    states = [streamer.init_state() for _ in waves]
    pos = [0] * len(waves)
    outs = [[] for _ in waves]
    while any(p < w.numel() for p, w in zip(pos, waves)):
        pieces = []
        for i, w in enumerate(waves):
            n = int(rng.integers(1, 2400))
            pieces.append(w[pos[i]: pos[i] + n] if pos[i] < w.numel() else None)
            pos[i] += n
        states, feats = streamer.step(states, pieces)
        for i, f in enumerate(feats):
            outs[i].append(f)
    states, feats = streamer.flush(states)
    for i, w in enumerate(waves):
        got = torch.cat(outs[i] + [feats[i]], dim=1)
        ref = offline.encode_audio(w.numpy())
        ref = ref.hidden_states[:, 0, : int(ref.lengths[0])]
        assert got.shape == ref.shape
        assert (got - ref).abs().max().item() <= 1e-4
        assert (got[0] - got[2]).abs().max() > 1e-2  # every layer, not one repeated


def test_streamify_stops_on_time_and_resumes(tmp_path, teacher_path, data):
    out = str(tmp_path / "resumed.nemo")
    first, _ = run_streamify(teacher_path, out, data, "--chunks-ms", "160", "--steps", "6", "--max-minutes", "1e-6")
    assert first["stopped_by_time"] and first["steps"] == 1
    assert NestEncoder(out).encoder.att_context_style == "chunked_limited"  # a usable .nemo already
    second, lines = run_streamify(teacher_path, out, data, "--chunks-ms", "160", "--steps", "6")
    assert any("resuming" in line and "step 1" in line for line in lines)
    assert second["steps"] == 6 and not second["stopped_by_time"]
    from agent.training.streamify import state_dir

    steps = [json.loads(line)["step"] for line in open(os.path.join(state_dir(out), "metrics.jsonl"))]
    assert steps == [0, 1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="--no-resume"):
        run_streamify(teacher_path, out, data, "--chunks-ms", "160,320", "--steps", "6")


def test_causal_kernel_keeps_past_taps_and_folds_the_future():
    from agent.training.streamify import causal_kernel_from

    w = torch.arange(1.0, 10.0).reshape(1, 1, 9)  # offsets -4..4
    c = causal_kernel_from(w)
    assert c.flatten().tolist() == [0, 0, 0, 0, 1, 2, 3, 4, 5 + 6 + 7 + 8 + 9]
    assert c.sum() == w.sum()  # same response to a constant input


# -- Ultravox: swap, serve ---------------------------------------------------------------

@pytest.fixture(scope="module")
def full_checkpoint(tmp_path_factory, teacher_path):
    """An Ultravox checkpoint whose audio tower is the full-context teacher."""
    from agent.ultravox.build import build_random_checkpoint

    path = build_random_checkpoint(str(tmp_path_factory.mktemp("full") / "ckpt"), nest="tiny", llm="tiny",
                                   layers="all", stack_factor=3, seed=5)
    from agent.ultravox.model import ENCODER_FILE

    assert NestEncoder(os.path.join(path, ENCODER_FILE)).encoder.att_context_style == "regular"
    return path


def test_refusal_is_one_clear_line_naming_both_fixes(full_checkpoint):
    import serve

    with pytest.raises(SystemExit) as exc:
        serve.build_server(serve.parse_args(["--model", full_checkpoint, "--port", "0"]))
    message = str(exc.value.code)
    assert "\n" not in message and message.startswith("error:")
    assert "full-context" in message and "agent.training.streamify" in message and "--approximate" in message
    assert "NESTVOX_APPROXIMATE" in message


async def test_approximate_serves_full_context_with_one_warning(full_checkpoint, capfd, monkeypatch):
    import serve

    monkeypatch.setenv("NESTVOX_APPROXIMATE", "1")
    server, streamer = serve.build_server(serve.parse_args(["--model", full_checkpoint, "--port", "0"]))
    err = capfd.readouterr().err
    assert err.count("WARNING:") == 1 and "--approximate" in err
    assert not streamer.report["exact"]


async def test_serve_streams_swapped_student_checkpoint(streamified, full_checkpoint, data, tmp_path):
    """The student swapped into the teacher's checkpoint: served with no flag, and the streamed
    reply equals the offline reply (the student streams exactly)."""
    import asyncio

    from websockets.asyncio.client import connect

    import serve
    from agent.training.swap_encoder import swap_encoder
    from agent.ultravox import UltravoxInference

    swapped = swap_encoder(full_checkpoint, streamified[0], str(tmp_path / "swapped"))
    server, streamer = serve.build_server(serve.parse_args(["--model", swapped, "--port", "0", "--chunk-ms", "320",
                                                            "--instructions", "Answer briefly."]))
    assert streamer.report["exact"] and streamer.report["trained_for_this_context"]
    audio = waves_of(data[1])[0]
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    await server.start()
    try:
        async with connect(server.url) as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "session.update", "session": {
                "type": "realtime", "max_output_tokens": 6,
                "audio": {"input": {"turn_detection": None, "format": {"type": "audio/pcm", "rate": 16000}}}}}))
            for i in range(0, len(pcm), 1600):
                await ws.send(pcm[i:i + 1600].tobytes())
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            await ws.send(json.dumps({"type": "response.create"}))
            events = []
            while not events or events[-1]["type"] != "response.done":
                events.append(json.loads(await asyncio.wait_for(ws.recv(), 60)))
    finally:
        await server.stop()
    text = "".join(e.get("delta", "") for e in events if e["type"].endswith("text.delta"))
    expected = UltravoxInference(swapped).generate("", audio=pcm.astype(np.float32) / 32768,
                                                   system_prompt="Answer briefly.", max_new_tokens=6)
    assert text == expected and expected


def test_recipe_streamifies_a_pretrained_audio_model(teacher_path, data, tmp_path):
    from agent.nest.streamable import not_streamable_reasons
    from agent.training.config import load_config
    from agent.training.streamify import streamify_audio_model
    from agent.training.train import build_audio_tower

    config = load_config(None, [f"audio_model={teacher_path}", f"output_dir={tmp_path}", f"data.train_manifest={data[0]}",
                                f"data.val_manifest={data[1]}", "streamify.enabled=true", "streamify.steps=2",
                                "streamify.chunks_ms=320", "streamify.batch_size=2", "train.threads=1"])
    lines = []
    config["audio_model"] = streamify_audio_model(config, lines.append)
    assert config["audio_model"] == str(tmp_path / "streamified_nest.nemo")
    tower = build_audio_tower(config)
    assert not_streamable_reasons(tower) == [] and list(tower.encoder.att_context_size) == [64, 3]
    again = []
    config["audio_model"] = teacher_path
    assert streamify_audio_model(config, again.append) == str(tmp_path / "streamified_nest.nemo")
    assert any("reusing" in line for line in again)  # a finished student is not distilled again
    with pytest.raises(ValueError, match="pretrained audio_model"):
        streamify_audio_model(load_config(None, ["streamify.enabled=true"]))


def test_streaming_report_student_column(streamified, data, capsys):
    from agent.nest.streaming_report import main

    out, report, _ = streamified
    main(["--nest-model", report["teacher"], "--student-model", out, "--manifest", data[1], "--chunks-ms", "320",
          "--limit", "1"])
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if line.startswith("| 320 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    naive, student = (float(v) for v in cells[-2].split("/"))
    assert "L0 naive / student" in printed and student > naive and float(cells[-1]) <= 1e-4


def test_pretrain_nest_trains_a_full_context_nest_with_nemos_objective(data, tmp_path):
    from agent.nest.streamable import not_streamable_reasons
    from agent.training.pretrain_nest import main

    out = str(tmp_path / "nest.nemo")
    main(["--out", out, "--manifest", data[0], "--val-manifest", data[1], "--shape", "32,2,2,16", "--steps", "3",
          "--batch-size", "2", "--eval-every", "3", "--warmup-steps", "1", "--threads", "1"])
    records = [json.loads(line) for line in open(str(tmp_path / "nest.pretrain" / "metrics.jsonl"))]
    assert [r["step"] for r in records] == [1, 2, 3]
    # masked-token cross-entropy over a 256-entry codebook: finite, about log(256) at the start
    assert all(np.isfinite(r["loss"]) and 3.0 < r["loss"] < 8.0 for r in records)
    assert np.isfinite(records[-1]["val_loss"])
    encoder = NestEncoder(out, layer="all")
    assert encoder.num_layers == 2 and encoder.hidden_size == 32
    assert len(not_streamable_reasons(encoder)) == 3  # full context, like the published checkpoints


def test_probe_word_error_rate():
    from agent.training.probe import edit_distance, word_error_rate

    assert edit_distance("a b c".split(), "a x c d".split()) == 2
    # a head that emits word 1, blank, word 1, word 2 on four frames -> "on on off" after CTC collapse
    logits = torch.full((4, 3), -10.0)
    for t, k in enumerate([1, 0, 1, 2]):
        logits[t, k] = 10.0
    wer = word_error_rate(lambda x: logits[None], [torch.zeros(4, 1)], [["on", "off"]], {1: "on", 2: "off"})
    assert wer == 50.0


def test_processor_from_a_student_config_batches(streamified, data):
    from agent.nest import NestProcessor

    student = NestEncoder(streamified[0])
    processor = NestProcessor.from_config(student.nemo_cfg)  # what UltravoxProcessor.from_pretrained builds
    waves = waves_of(data[1])[:2]
    batch = processor(waves)
    own = student.processor()(waves)
    assert torch.equal(batch["feature_lengths"], own["feature_lengths"])
    assert (batch["input_features"] - own["input_features"]).abs().max() < 1e-5
