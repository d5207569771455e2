"""Training pipeline: synthetic data, the domain, a tiny training run, evaluation."""
import json
import os

import numpy as np
import pytest
import torch

from agent.training.domain import DEVICES, ROOMS, STATES, Domain, arithmetic_example, timer_example
from agent.training.evaluate import HELD_OUT_ROW, exact_match, score
from agent.training.synth import ReservedVoiceError, check_voices, synthesize
from agent.training.voices import is_reserved, reserved_voices, training_voices

MANIFEST_KEYS = {"audio_filepath", "duration", "text", "answer", "intent", "voice", "reserved", "held_out", "slots",
                 "speed", "pitch", "snr_db", "split", "seed"}


# -- voices and the synthesizer ----------------------------------------------------------
def test_reserved_voice_classification():
    for voice in ["en-029", "en-gb-scotland", "en-029+f3", "en-us+m6", "en-gb+KLATT4", "en-us-nyc+john",
                  "en+linda", "en-gb-x-rp+grandpa", "en-gb-scotland+m2", "en-us+f5"]:
        assert is_reserved(voice), voice
    for voice in ["en-us", "en-gb", "en-us+m3", "en-gb-x-rp+f4", "en-us+klatt", "en-us+m7", "en+johnny"]:
        assert not is_reserved(voice), voice
    train, test = training_voices(), reserved_voices()
    assert len(train) > 100 and not any(is_reserved(v) for v in train)
    assert test and all(is_reserved(v) for v in test) and not set(train) & set(test)


def test_synth_refuses_reserved_voices_for_training(tmp_path):
    for split in ("train", "val"):
        for voice in ("en-us+m6", "en-029", "en-gb-scotland+f3"):
            with pytest.raises(ReservedVoiceError):
                check_voices(["en-us", voice], split)
            with pytest.raises(ReservedVoiceError):
                synthesize(str(tmp_path / "x"), split, n=2, voices=[voice], workers=1, progress=False)
    with pytest.raises(ReservedVoiceError):
        check_voices(["en-029", "en-us+f3"], "test")
    assert check_voices(["en-029+f3", "en-us+m6"], "test") == ["en-029+f3", "en-us+m6"]
    assert not os.path.exists(tmp_path / "x" / "train.jsonl")


@pytest.fixture(scope="module")
def train_manifest(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return synthesize(str(out), "train", n=12, seed=3, workers=2, noise_db=(10, 20), noise_prob=0.5, progress=False,
                      weights={"device": 0.4, "timer": 0.3, "arithmetic": 0.3})


def test_manifest_fields(train_manifest):
    import soundfile as sf

    items = [json.loads(line) for line in open(train_manifest)]
    assert len(items) == 12
    domain = Domain(seed=0)
    answers = {ex.text: ex.answer for exs in domain.all_examples(include_held_out=True).values() for ex in exs}
    for it in items:
        assert MANIFEST_KEYS <= set(it)
        data, rate = sf.read(it["audio_filepath"], dtype="float32")
        assert rate == 16000 and data.ndim == 1
        assert it["duration"] == pytest.approx(len(data) / 16000, abs=1e-3) and 0.5 < it["duration"] < 6
        assert np.abs(data).max() > 0.1  # speech, not silence
        assert it["answer"] == answers[it["text"]]
        assert it["intent"] in ("device", "timer", "arithmetic") and it["split"] == "train"
        assert not it["reserved"] and not is_reserved(it["voice"]) and not it["held_out"]
    assert {it["intent"] for it in items} == {"device", "timer", "arithmetic"}
    assert any(it["snr_db"] is not None for it in items) and any(it["snr_db"] is None for it in items)


def test_test_split_uses_reserved_voices_and_held_out_combos(tmp_path):
    from agent.training.synth import plan_jobs

    jobs = plan_jobs(str(tmp_path), "test", 120, reserved_voices(), 0, Domain(seed=0), (150, 170), (40, 60), None, 0.0)
    assert all(j["reserved"] for j in jobs)
    assert any(j["held_out"] for j in jobs) and any(j["intent"] == "device" and not j["held_out"] for j in jobs)
    train_jobs = plan_jobs(str(tmp_path), "train", 400, training_voices(), 0, Domain(seed=0), (150, 170), (40, 60),
                           None, 0.0)
    assert not any(j["held_out"] or j["reserved"] for j in train_jobs)
    # validation uses training voices but does include the held-out combinations, so training
    # can watch generalization to them without ever touching a reserved voice
    val_jobs = plan_jobs(str(tmp_path), "val", 400, training_voices(), 1, Domain(seed=0), (150, 170), (40, 60),
                         None, 0.0)
    assert not any(j["reserved"] for j in val_jobs)
    held_val = [j for j in val_jobs if j["held_out"]]
    assert held_val and {j["intent"] for j in held_val} == {"device", "out_of_domain"}
    held_devices = [j for j in held_val if j["intent"] == "device"]
    assert {(j["slots"]["device"], j["slots"]["room"]) for j in held_devices} <= Domain(seed=0).held_out
    assert {j["slots"]["template"] for j in held_val if j["intent"] == "out_of_domain"} <= Domain(seed=0).held_out_ood


def test_text_manifest_holds_every_pair_and_sampler_balances_intents(tmp_path):
    import random

    from agent.training.data import TextPairSampler, read_text_pairs
    from agent.training.synth import main as synth_main

    synth_main(["--out", str(tmp_path), "--split", "text", "--domain-seed", "0"])
    pairs = read_text_pairs(str(tmp_path / "text.jsonl"))
    domain = Domain(seed=0)
    # every pair of the domain, held-out device combinations included; held-out out-of-domain
    # phrasings are the exception (kept out of the training text too)
    every = [ex for exs in domain.all_examples(include_held_out=True).values() for ex in exs
             if not (ex.held_out and ex.intent == "out_of_domain")]
    assert len(pairs) == len(every) == 50 + 30 + 13 * 13 * 3 + len(domain.ood_examples("train"))
    assert {(p["text"], p["answer"]) for p in pairs} == {(ex.text, ex.answer) for ex in every}
    held = [p for p in pairs if p["held_out"]]
    assert len(held) == 10 and all(p["intent"] == "device" for p in held)
    assert not list(tmp_path.glob("wavs/*"))  # text only
    drawn = TextPairSampler(pairs, random.Random(0)).sample(6000)
    share = {k: sum(p["intent"] == k for p in drawn) / len(drawn) for k in ("device", "timer", "arithmetic",
                                                                           "out_of_domain")}
    assert all(0.22 < v < 0.28 for v in share.values()), share  # even over intents, not 86% sums
    assert 0.03 < sum(p["held_out"] for p in drawn) / len(drawn) < 0.07  # 10 of 50 device pairs
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "turn on the fan"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_text_pairs(str(bad))


def test_extra_training_vocabulary_keeps_held_out_and_test_words_apart(tmp_path):
    import random

    from agent.training.domain import EXTRA_DEVICES, EXTRA_ROOMS
    from agent.training.synth import main as synth_main
    from agent.training.synth import plan_jobs

    plain, extra = Domain(seed=0), Domain(seed=0, extra_vocab=True)
    assert extra.held_out == plain.held_out
    assert extra.device_examples("held_out") == plain.device_examples("held_out")
    train = extra.device_examples("train")
    pairs = {(e.slot_dict()["device"], e.slot_dict()["room"]) for e in train}
    assert len(train) == 2 * (10 * 10 - 5) and not pairs & plain.held_out
    for word in DEVICES + EXTRA_DEVICES:  # every device word is trained with 9 or 10 rooms
        assert sum(d == word for d, _ in pairs) >= 9
    for word in ROOMS + EXTRA_ROOMS:
        assert sum(r == word for _, r in pairs) >= 9
    jobs = plan_jobs(str(tmp_path), "train", 600, training_voices(), 0, extra, (150, 170), (40, 60), None, 0.0,
                     weights={"device": 0.5, "timer": 0.25, "arithmetic": 0.25})
    spoken = " ".join(j["text"] for j in jobs)
    assert any(w in spoken for w in EXTRA_DEVICES) and any(w in spoken for w in EXTRA_ROOMS)
    assert not any(j["held_out"] for j in jobs)
    # val/test never take the extra words (the CLI refuses, the test split's domain has none)
    with pytest.raises(SystemExit):
        synth_main(["--out", str(tmp_path), "--split", "test", "--n", "2", "--extra-vocab"])
    test_jobs = plan_jobs(str(tmp_path), "test", 300, reserved_voices(), 2, plain, (150, 170), (40, 60), None, 0.0)
    test_text = " ".join(j["text"] for j in test_jobs)
    assert not any(f" {w} " in f" {test_text} " for w in EXTRA_DEVICES + EXTRA_ROOMS)
    drawn = extra.sample(20, random.Random(0), weights={"device": 1.0})
    assert all(e.intent == "device" for e in drawn)


def test_epoch_batches_bucket_by_length_and_cover_each_item_once():
    import random

    from agent.training.data import epoch_batches

    rng = np.random.default_rng(0)
    lengths = rng.uniform(1.0, 4.0, 1000)
    bucketed = epoch_batches(1000, 10, random.Random(0), lengths, bucket_batches=8)
    plain = epoch_batches(1000, 10, random.Random(0))
    first = [next(bucketed) for _ in range(100)]
    assert all(len(b) == 10 for b in first)
    assert sorted(i for b in first for i in b) == list(range(1000))  # one epoch: every item once

    def spread(batches):
        return np.mean([lengths[b].max() - lengths[b].min() for b in batches])

    assert spread(first) < 0.2 * spread([next(plain) for _ in range(100)])
    # batches are shuffled after bucketing: lengths do not trend through the epoch
    means = [lengths[b].mean() for b in first]
    assert abs(np.corrcoef(np.arange(100), means)[0, 1]) < 0.4


# -- the domain ---------------------------------------------------------------------------
def test_domain_held_out_device_combinations():
    domain = Domain(seed=0)
    every = {(e.slot_dict()["state"], e.slot_dict()["device"], e.slot_dict()["room"]) for e in domain.device_examples("all")}
    held = {(e.slot_dict()["state"], e.slot_dict()["device"], e.slot_dict()["room"]) for e in domain.device_examples("held_out")}
    train = {(e.slot_dict()["state"], e.slot_dict()["device"], e.slot_dict()["room"]) for e in domain.device_examples("train")}
    assert len(every) == len(STATES) * len(DEVICES) * len(ROOMS) == 50
    assert len(held) >= 0.2 * len(every) and not held & train and held | train == every
    assert len(domain.held_out) >= 0.2 * len(DEVICES) * len(ROOMS)
    # every device and room is still trained on, and the choice is deterministic by seed
    assert {d for _, d, _ in train} == set(DEVICES) and {r for _, _, r in train} == set(ROOMS)
    assert Domain(seed=0).held_out == domain.held_out and Domain(seed=1).held_out != domain.held_out
    import random

    sampled = domain.sample(500, random.Random(0))
    assert not any(e.held_out for e in sampled)
    assert domain.device_examples("held_out")[0].answer.startswith("Turning ")


def test_domain_replies():
    assert timer_example(7).text == "set a timer for seven minutes" and timer_example(7).answer == "Timer set for 7 minutes."
    assert timer_example(21).text == "set a timer for twenty one minutes"
    assert arithmetic_example(7, "times", 8).answer == "7 times 8 is 56."
    assert arithmetic_example(3, "minus", 5).answer == "3 minus 5 is -2."
    assert arithmetic_example(12, "plus", 0).text == "what is twelve plus zero"
    assert len(Domain.arithmetic_examples()) == 3 * 13 * 13 and len(Domain.timer_examples()) == 30


# -- evaluation counting ------------------------------------------------------------------
def test_exact_match_scoring_toy():
    records = [
        {"intent": "timer", "answer": "Timer set for 5 minutes.", "prediction": "Timer set for 5 minutes."},
        {"intent": "timer", "answer": "Timer set for 6 minutes.", "prediction": " Timer set for 6 minutes. "},
        {"intent": "timer", "answer": "Timer set for 7 minutes.", "prediction": "Timer set for 7 minutes"},
        {"intent": "arithmetic", "answer": "1 plus 1 is 2.", "prediction": "1 plus 1 is 3."},
        {"intent": "device", "answer": "Turning on the fan in the office.", "prediction": "Turning on the fan in the office.",
         "held_out": True},
        {"intent": "device", "answer": "Turning off the tv in the garage.", "prediction": "Turning off the tv in the garage.",
         "held_out": False},
        {"intent": "device", "answer": "Turning on the tv in the garage.", "prediction": "Turning on the TV in the garage.",
         "held_out": True},
    ]
    assert exact_match(" a. ", "a.") and not exact_match("a", "a.")
    table = score(records)
    assert list(table) == ["arithmetic", "device", "timer", HELD_OUT_ROW, "overall"]
    assert table["timer"] == {"n": 3, "correct": 2, "accuracy": pytest.approx(2 / 3)}
    assert table["arithmetic"]["correct"] == 0 and table["device"]["correct"] == 2 and table["device"]["n"] == 3
    assert table[HELD_OUT_ROW] == {"n": 2, "correct": 1, "accuracy": 0.5}
    assert table["overall"] == {"n": 7, "correct": 4, "accuracy": pytest.approx(4 / 7)}


# -- a tiny training run -------------------------------------------------------------------
def tiny_config(manifest, out, steps):
    from agent.training.config import load_config

    return load_config(None, [
        f"data.train_manifest={manifest}", f"output_dir={out}", f"train.steps={steps}", "seed=0",
        "text_model=build:64,2,4,2,128", "tokenizer_vocab_size=300",
        "audio_model={shape: {d_model: 32, n_layers: 2, n_heads: 2, conv_channels: 8, ff_expansion_factor: 2, "
        "num_classes: 16}, streaming: true, att_context_size: [16, 1], normalize: NA, conv_norm_type: batch_norm, "
        "dropout: 0.0}",
        "stack_factor=3", "train.batch_size=6", "train.lr=3e-3", "train.warmup_steps=3", "train.min_lr_ratio=0.5",
        "train.text_pretrain_steps=0", "train.text_mix_weight=0.1", "train.attn_implementation=eager",
        "loss.kl_weight=0.1", "loss.ctc_weight=0.2",
        "augment={}",
        "eval.every=1000", "eval.val_batches=1", "eval.n_generate=2", "eval.save_every=1000", "eval.max_new_tokens=8",
    ])


@pytest.fixture(scope="module")
def trained(train_manifest, tmp_path_factory):
    from agent.training.train import Trainer

    out = str(tmp_path_factory.mktemp("run"))
    trainer = Trainer(tiny_config(train_manifest, out, steps=40), log=lambda *a: None)
    final = trainer.train()
    return trainer, final, out


def test_training_loss_falls(trained):
    _, _, out = trained
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in records] == list(range(1, 41))
    ce = [r["ce"] for r in records]
    first, last = np.mean(ce[:4]), np.mean(ce[-4:])
    assert last < 0.5 * first, (first, last)
    assert "kl" in records[0] and "text" in records[0] and "ctc" in records[0]
    assert records[-1]["val_loss"] is not None and 0.0 <= records[-1]["val_exact"] <= 1.0


def test_checkpoint_reloads_with_identical_logits(trained, train_manifest):
    from agent.training.data import Collator, ManifestDataset
    from agent.training.train import make_processor
    from agent.ultravox import UltravoxInference
    from agent.ultravox.model import UltravoxModel

    trainer, final, _ = trained
    # trained with eager attention (speed), handed back with the LLM's own kernel
    assert trainer.model.language_model.config._attn_implementation == trainer.inference_attn != "eager"
    for name in ("config.json", "audio_encoder.nemo", "projector.safetensors", "training_config.yaml"):
        assert os.path.isfile(os.path.join(final, name)), name
    data = ManifestDataset.from_manifest(train_manifest, limit=4)
    collator = Collator(make_processor(trainer.model, trainer.tokenizer), [None], augment=None)
    batch = collator(data, [0, 1, 2, 3], train=False)
    trainer.model.eval()
    loaded = UltravoxModel.from_pretrained(final)
    with torch.no_grad():
        a = trainer.model(**batch.inputs).logits
        b = loaded(**batch.inputs).logits
    assert torch.equal(a, b)
    assert a.std() > 0.1
    inference = UltravoxInference(final)
    wave = data.wave(0)
    assert inference.generate("", audio=wave, max_new_tokens=8) == UltravoxInference.from_model(
        trainer.model, trainer.tokenizer).generate("", audio=wave, max_new_tokens=8)


def test_resume_continues_from_the_last_checkpoint(trained, train_manifest):
    from agent.training.train import Trainer, checkpoints

    _, _, out = trained
    assert [s for s, _ in checkpoints(out)] == [40]
    trainer = Trainer(tiny_config(train_manifest, out, steps=42), log=lambda *a: None)
    assert trainer.step == 40
    trainer.train()
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in records][-2:] == [41, 42]


def test_text_manifest_feeds_text_pretraining_and_the_text_mix(train_manifest, tmp_path):
    """With data.text_manifest, the LLM learns text pairs that never occur in the audio."""
    from agent.training.data import render_prompt
    from agent.training.train import Trainer

    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "open the pod bay doors", "answer": "Opening the pod bay doors.",
                                "intent": "device"}) + "\n")
    config = tiny_config(train_manifest, str(tmp_path / "run"), steps=3)
    config["data"]["text_manifest"] = str(text)
    config["train"].update(text_pretrain_steps=60, text_pretrain_lr=5e-3, text_pretrain_batch=8)
    trainer = Trainer(config, log=lambda *a: None)
    assert [p["text"] for p in trainer.text_items] == ["open the pod bay doors"]
    trainer.train()
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    # the text-mix loss is on the memorized pair: far below the reply loss on the audio
    assert max(r["text"] for r in records) < 0.5 and min(r["ce"] for r in records) > 1.0
    tok, llm = trainer.tokenizer, trainer.model.language_model.eval()
    prompt = tok(render_prompt(tok, None, "", audio=False, transcript="open the pod bay doors"),
                 add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = llm.generate(**prompt, max_new_tokens=40, do_sample=False)
    assert tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True) == "Opening the pod bay doors."


def test_evaluate_offline_and_streaming_agree(trained, train_manifest, capsys, tmp_path):
    from agent.training.evaluate import evaluate

    _, final, _ = trained
    tables = evaluate(final, train_manifest, streaming=True, limit=3, max_new_tokens=6, show_errors=0,
                      out_json=str(tmp_path / "eval.json"))
    assert set(tables) == {"offline", "streaming"}
    assert tables["offline"]["overall"]["n"] == 3
    records = json.load(open(tmp_path / "eval.json"))["records"]
    # a streaming-configured encoder: the Session's greedy replies are the offline ones
    offline = [r["prediction"] for r in records["offline"]]
    assert offline == [r["prediction"] for r in records["streaming"]] and any(offline)
    assert torch.is_grad_enabled()  # evaluation must not switch gradients off for its caller
    out = capsys.readouterr().out
    assert "offline: 3 utterances" in out and "streaming: 3 utterances" in out


def test_encoder_ctc_pretraining_trains_the_encoder_alone(train_manifest, tmp_path):
    """train.ctc_pretrain_steps: the encoder + CTC head learn first; the LLM and projector are
    untouched by that stage (with train.steps=0 they equal a freshly built model's)."""
    from agent.training.train import PRETRAIN_METRICS, Trainer

    def config(out, **train):
        c = tiny_config(train_manifest, str(tmp_path / out), steps=0)
        c["train"].update(text_mix_weight=0.0, **train)
        c["loss"]["kl_weight"] = 0.0
        return c

    fresh = Trainer(config("fresh"), log=lambda *a: None)
    trainer = Trainer(config("pre", ctc_pretrain_steps=40, ctc_pretrain_lr=3e-3), log=lambda *a: None)
    trainer.train()
    records = [json.loads(line) for line in open(tmp_path / "pre" / PRETRAIN_METRICS)]
    assert [r["step"] for r in records] == list(range(1, 41))
    ctc = [r["ctc"] for r in records]
    assert np.mean(ctc[-5:]) < 0.6 * np.mean(ctc[:5]), (ctc[:5], ctc[-5:])
    for name in ("language_model", "projector"):
        a, b = getattr(trainer.model, name).state_dict(), getattr(fresh.model, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    a, b = trainer.model.audio_tower.encoder.state_dict(), fresh.model.audio_tower.encoder.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())

    bad = config("bad", ctc_pretrain_steps=5)
    bad["loss"]["ctc_weight"] = 0.0
    with pytest.raises(ValueError, match="ctc_weight"):
        Trainer(bad, log=lambda *a: None).train()
