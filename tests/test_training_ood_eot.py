"""The demo domain's out-of-domain intent and the end-of-turn decision (labels, loss, scoring)."""
import json
import math
import random

import pytest
import torch

from agent.training.domain import (ANCHOR_TEMPLATES, DANGLING_WORDS, DECLINE, IN_DOMAIN, OOD_TEMPLATES, OUT_OF_DOMAIN,
                                   Domain, cut_points, expand_template, held_out_templates)
from agent.training.voices import reserved_voices, training_voices


# -- out of domain ---------------------------------------------------------------------------
def test_out_of_domain_requests_are_broad_varied_and_all_declined_exactly():
    domain = Domain(seed=0)
    every = domain.ood_examples("all")
    assert DECLINE == "Sorry, I can only control devices, set timers and do arithmetic."
    assert all(ex.answer == DECLINE and ex.intent == OUT_OF_DOMAIN for ex in every)
    categories = {ex.slot_dict()["category"] for ex in every}
    assert {"weather", "music", "news", "calls", "messages", "shopping", "facts", "jokes", "bookings"} <= categories
    per_category = {c: {ex.text for ex in every if ex.slot_dict()["category"] == c} for c in categories}
    assert all(len(v) >= 4 for v in per_category.values()), {c: len(v) for c, v in per_category.items()}
    assert len({ex.text for ex in every}) == len(every) > 600
    texts = {ex.text for ex in every}
    # requests that share words with the domain
    for text in ("turn the music up", "what time is the meeting", "set the table", "cancel the timer"):
        assert text in texts
    assert any(t.startswith("what is ") and " divided by " in t for t in texts)
    # never an in-domain request
    in_domain = {ex.text for k, exs in domain.all_examples(include_held_out=True).items() if k != OUT_OF_DOMAIN
                 for ex in exs}
    assert not texts & in_domain


def test_out_of_domain_held_out_phrasings_are_disjoint_and_seeded():
    domain = Domain(seed=0)
    train, held = domain.ood_examples("train"), domain.ood_examples("held_out")
    assert train and held and all(ex.held_out for ex in held) and not any(ex.held_out for ex in train)
    assert not {ex.text for ex in train} & {ex.text for ex in held}
    assert not {ex.slot_dict()["template"] for ex in train} & {ex.slot_dict()["template"] for ex in held}
    assert {ex.text for ex in train} | {ex.text for ex in held} == {ex.text for ex in domain.ood_examples("all")}
    assert 0.1 < len(held) / (len(train) + len(held)) < 0.35
    # every category keeps trained phrasings; the issue's own examples always train
    assert {ex.slot_dict()["category"] for ex in train} == set(OOD_TEMPLATES)
    assert not held_out_templates(0) & ANCHOR_TEMPLATES
    assert held_out_templates(0) == domain.held_out_ood != held_out_templates(1)
    # the training sample never draws a held-out phrasing
    drawn = domain.sample(3000, random.Random(0))
    ood = [ex for ex in drawn if ex.intent == OUT_OF_DOMAIN]
    assert 0.12 < len(ood) / len(drawn) < 0.22 and not any(ex.held_out for ex in ood)
    assert len({ex.slot_dict()["category"] for ex in ood}) == len(OOD_TEMPLATES)


def test_splits_keep_held_out_phrasings_and_reserved_voices_for_test(tmp_path):
    from agent.training.synth import plan_jobs

    domain = Domain(seed=0)
    held_texts = {ex.text for ex in domain.ood_examples("held_out")}
    train = plan_jobs(str(tmp_path), "train", 2000, training_voices(), 0, domain, (150, 170), (40, 60), None, 0.0,
                      cut_share=0.2)
    assert not any(j["held_out"] for j in train)
    assert not {j["text"] for j in train} & held_texts and not {j.get("full_text") for j in train} & held_texts
    test = plan_jobs(str(tmp_path), "test", 800, reserved_voices(), 2, domain, (150, 170), (40, 60), None, 0.0)
    ood = [j for j in test if j["intent"] == OUT_OF_DOMAIN]
    held = [j for j in ood if j["held_out"]]
    assert all(j["reserved"] for j in test) and all(j["done"] for j in test)
    assert 0.3 < len(held) / len(ood) < 0.7 and {j["text"] for j in held} <= held_texts
    assert all(j["answer"] == DECLINE for j in ood)


def test_text_manifest_has_no_held_out_out_of_domain_phrasing(tmp_path):
    from agent.training.data import read_text_pairs
    from agent.training.synth import main as synth_main

    synth_main(["--out", str(tmp_path), "--split", "text"])
    pairs = read_text_pairs(str(tmp_path / "text.jsonl"))
    ood = [p for p in pairs if p["intent"] == OUT_OF_DOMAIN]
    assert len(ood) == len(Domain(seed=0).ood_examples("train")) and not any(p["held_out"] for p in ood)
    assert all(p["answer"] == DECLINE for p in ood)
    assert sum(p["held_out"] for p in pairs if p["intent"] == "device") == 10  # device text keeps its held-out pairs


def test_expand_template_fills_every_slot():
    out = expand_template("book a flight to {city}")
    assert "book a flight to paris" in out and all("{" not in t for t in out)
    assert len(expand_template("what is {num} divided by {num}", limit=5)) <= 5


# -- end-of-turn labels ------------------------------------------------------------------
def test_cut_points_leave_an_unfinished_request():
    domain = Domain(seed=0)
    device = domain.device_examples("train")[0]
    assert cut_points(device) == list(range(1, len(device.text.split())))
    for ex in domain.ood_examples("all"):
        words = ex.text.split()
        for k in cut_points(ex):
            assert 1 <= k < len(words) and words[k - 1] in DANGLING_WORDS
    weather = next(ex for ex in domain.ood_examples("all") if ex.text == "what's the weather like in paris")
    assert cut_points(weather) == [1, 2, 5]  # "what's", "what's the", "what's the weather like in"


def test_cut_turns_in_the_manifest(tmp_path):
    from agent.training.synth import plan_jobs

    jobs = plan_jobs(str(tmp_path), "train", 1000, training_voices(), 0, Domain(seed=0), (150, 170), (40, 60), None,
                     0.0, cut_share=0.3)
    cut = [j for j in jobs if not j["done"]]
    assert 0.2 < len(cut) / len(jobs) < 0.35
    for j in cut:
        words = j["full_text"].split()
        assert j["text"] == " ".join(words[:j["cut_words"]]) and 1 <= j["cut_words"] < len(words)
    assert {j["intent"] for j in cut} == set(IN_DOMAIN) | {OUT_OF_DOMAIN}
    # without cut_share nothing is cut, and the rest of the plan is unchanged by it
    plain = plan_jobs(str(tmp_path), "train", 1000, training_voices(), 0, Domain(seed=0), (150, 170), (40, 60), None,
                      0.0)
    assert all(j["done"] for j in plain)
    assert [j.get("full_text", j["text"]) for j in jobs] == [j["text"] for j in plain]


def test_synthesized_cut_turn_is_the_prefix_spoken(tmp_path):
    from agent.training.synth import synthesize

    path = synthesize(str(tmp_path), "train", n=12, seed=0, workers=1, progress=False, cut_share=1.0, noise_db=None)
    items = [json.loads(line) for line in open(path)]
    cut = [it for it in items if not it["done"]]
    assert cut and all(it["text"] != it["full_text"] and it["full_text"].startswith(it["text"] + " ") for it in cut)


# -- end-of-turn loss ------------------------------------------------------------------------
def test_end_of_turn_log_probs_read_the_token_after_the_last_audio_position():
    from agent.training.data import end_of_turn_log_probs, end_of_turn_loss, last_audio_positions

    AUDIO, END, V = 7, 3, 10
    ids = torch.tensor([[1, AUDIO, AUDIO, AUDIO, END, 5, 0], [1, 2, AUDIO, AUDIO, END, 5, 6]])
    assert last_audio_positions(ids, AUDIO).tolist() == [3, 3]
    logits = torch.zeros(2, 7, V)
    logits[0, 3, END] = math.log(9.0)  # p(END) = 9 / (9 + 9) = 0.5
    logits[1, 3, END] = math.log(27.0)  # p(END) = 27 / 36 = 0.75
    logits[1, 2, END] = 100.0  # an earlier audio position: not read
    log_done, log_not, end_ids = end_of_turn_log_probs(logits, ids, AUDIO)
    assert end_ids.tolist() == [END, END]
    assert log_done.exp().tolist() == pytest.approx([0.5, 0.75])
    assert log_not.exp().tolist() == pytest.approx([0.5, 0.25])
    done = torch.tensor([1.0, 0.0])  # row 0 complete, row 1 cut
    loss = end_of_turn_loss(logits, ids, AUDIO, done)
    assert float(loss) == pytest.approx(-(math.log(0.5) + math.log(0.25)) / 2)
    # the gradient pushes p(END) up for the complete turn and down for the cut one
    logits.requires_grad_(True)
    end_of_turn_loss(logits, ids, AUDIO, done).backward()
    assert logits.grad[0, 3, END] < 0 < logits.grad[1, 3, END]
    with pytest.raises(ValueError):
        last_audio_positions(torch.tensor([[1, 2, 3]]), AUDIO)


def test_reply_loss_matches_the_model_loss_and_is_zero_without_labels():
    from agent.training.data import IGNORE, reply_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[IGNORE, IGNORE, 4, 5, 2], [IGNORE, IGNORE, IGNORE, 1, IGNORE]])
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1),
                                            ignore_index=IGNORE)
    assert float(reply_loss(logits, labels)) == pytest.approx(float(ref))
    none = torch.full((2, 5), IGNORE)
    zero = reply_loss(logits.requires_grad_(True), none)
    assert float(zero.detach()) == 0.0
    zero.backward()


def test_collator_labels_no_reply_for_a_cut_turn(tmp_path):
    from agent.training.data import Collator, IGNORE, ManifestDataset
    from agent.training.synth import synthesize
    from agent.training.train import build_model, make_processor
    from agent.training.config import load_config

    path = synthesize(str(tmp_path), "train", n=6, seed=1, workers=1, progress=False, cut_share=0.5, noise_db=None)
    data = ManifestDataset.from_manifest(path)
    assert {it["done"] for it in data.items} == {True, False}
    config = load_config(None, ["text_model=build:32,1,2,1,64", "tokenizer_vocab_size=300",
                                "audio_model={shape: {d_model: 16, n_layers: 1, n_heads: 2, conv_channels: 4, "
                                "ff_expansion_factor: 2, num_classes: 16}, streaming: true, "
                                "att_context_size: [[16, 1], [16, 3]], att_context_probs: [0.5, 0.5], normalize: NA}",
                                "stack_factor=2"])
    corpus = [t for it in data.items for t in (it["text"], it["answer"])]
    model, tokenizer = build_model(config, corpus)
    assert model.audio_tower.encoder.att_context_size_all == [[16, 1], [16, 3]]
    assert model.audio_tower.encoder.att_context_probs == [0.5, 0.5]
    batch = Collator(make_processor(model, tokenizer), [None], augment=None)(data, list(range(6)), train=False)
    for i, it in enumerate(data.items):
        n_labels = int((batch.inputs["labels"][i] != IGNORE).sum())
        assert batch.done[i] == float(it["done"])
        assert (n_labels > 0) == it["done"]
    ids = batch.inputs["input_ids"]
    audio = make_processor(model, tokenizer).audio_token_id
    from agent.training.data import last_audio_positions

    pos = last_audio_positions(ids, audio)
    assert all(tokenizer.convert_ids_to_tokens(int(ids[i, p + 1])) == "<|im_end|>" for i, p in enumerate(pos))


# -- scoring ---------------------------------------------------------------------------------
def test_score_rows_for_out_of_domain_and_wrong_declines():
    from agent.training.evaluate import DECLINED_ROW, IN_DOMAIN_ROW, OOD_HELD_OUT_ROW, score

    records = [
        {"intent": "timer", "answer": "Timer set for 5 minutes.", "prediction": "Timer set for 5 minutes."},
        {"intent": "timer", "answer": "Timer set for 6 minutes.", "prediction": DECLINE},
        {"intent": "arithmetic", "answer": "1 plus 1 is 2.", "prediction": "1 plus 1 is 2."},
        {"intent": "arithmetic", "answer": "1 plus 2 is 3.", "prediction": "1 plus 1 is 2."},
        {"intent": OUT_OF_DOMAIN, "answer": DECLINE, "prediction": DECLINE, "held_out": True},
        {"intent": OUT_OF_DOMAIN, "answer": DECLINE, "prediction": "Timer set for 5 minutes.", "held_out": True},
        {"intent": OUT_OF_DOMAIN, "answer": DECLINE, "prediction": DECLINE},
    ]
    table = score(records)
    assert table[OUT_OF_DOMAIN] == {"n": 3, "correct": 2, "accuracy": pytest.approx(2 / 3)}
    assert table[OOD_HELD_OUT_ROW] == {"n": 2, "correct": 1, "accuracy": 0.5}
    assert table[IN_DOMAIN_ROW] == {"n": 4, "correct": 2, "accuracy": 0.5}
    assert table[DECLINED_ROW] == {"n": 4, "correct": 1, "accuracy": 0.25}
    assert table["overall"] == {"n": 7, "correct": 4, "accuracy": pytest.approx(4 / 7)}


def test_end_of_turn_report_auc_and_accuracy():
    from agent.training.evaluate import auc, end_of_turn_report

    assert auc([0.9, 0.8], [0.1, 0.2]) == 1.0 and auc([0.1], [0.9]) == 0.0 and auc([0.5], [0.5]) == 0.5
    items = [{"done": True}, {"done": True}, {"done": True}, {"done": False}, {"done": False}]
    report = end_of_turn_report(items, [0.9, 0.6, 0.3, 0.4, 0.7])
    assert report["n_done"] == 3 and report["n_cut"] == 2
    assert report["accuracy"] == pytest.approx(3 / 5)  # 0.9, 0.6 above; 0.4 below
    assert report["complete_above"] == pytest.approx(2 / 3) and report["cut_below"] == 0.5
    assert report["auc"] == pytest.approx(3 / 6)  # pairs (done > cut): 0.9 > both, 0.6 > 0.4, 0.3 > none
    assert report["mean_p_done_cut"] == pytest.approx(0.55)
