"""UltravoxConfig / Model / Processor / Inference on a tiny checkpoint."""
import numpy as np
import pytest
import torch

from agent.ultravox import UltravoxConfig, UltravoxInference, UltravoxModel
from agent.ultravox.model import ENCODER_FILE, LLM_DIR


def wave(seconds, seed=0):
    return (np.random.default_rng(seed).standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32)


def on_device(inference, inputs):
    """Processor outputs (CPU tensors) on the model's device, as `prepare` does."""
    return {k: v.to(inference.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def test_nest_config_type_is_registered_and_knows_the_encoder(tiny_checkpoint):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_checkpoint)
    assert isinstance(config, UltravoxConfig)
    assert config.audio_config.model_type == "nest"
    assert config.audio_config.hidden_size == 32 and config.audio_config.num_hidden_layers == 3
    assert config.audio_config.layer_indices() == [0, 1, 2]
    assert config.audio_config.subsampling == "dw_striding" and config.audio_config.subsampling_factor == 8
    named = UltravoxConfig(audio_config={"model_type": "nest", "_name_or_path": "nvidia/ssl_en_nest_large_v1.0", "layers": "all"})
    assert named.audio_config.hidden_size == 512 and named.audio_config.layer_indices() == list(range(17))


@pytest.mark.parametrize("seconds", [0.1, 1.0, 1.37, 10.0, 45.0])
@pytest.mark.parametrize("context", [None, 1000])
def test_audio_token_count_equals_inserted_embeddings(tiny_inference, seconds, context):
    proc = tiny_inference.processor
    proc.audio_context_size = context  # 1000 mel frames = 10 s per encoder call
    try:
        audio = wave(seconds)
        text = tiny_inference.build_prompt("What is this?", has_audio=True)
        inputs = on_device(tiny_inference, proc(text, audio=audio))
        n_slots = int((inputs["input_ids"] == proc.audio_token_id).sum())
        assert n_slots == proc.audio_token_count(len(audio)) == int(inputs["audio_token_len"][0])
        with torch.no_grad():
            embeds = tiny_inference.model.audio_embeddings(inputs["input_features"], inputs["feature_lengths"])
        assert sum(e.shape[0] for e in embeds) == n_slots
        if context is not None and seconds > 10:
            assert inputs["input_features"].shape[0] == int(np.ceil(seconds / 10))
        # the model's own merge accepts it (it raises on any mismatch)
        with torch.no_grad():
            merged = tiny_inference.model.embed_inputs(inputs["input_ids"], inputs["input_features"], inputs["feature_lengths"])
        assert merged.shape[1] == inputs["input_ids"].shape[1]
    finally:
        proc.audio_context_size = None


def test_mismatched_audio_tokens_are_refused(tiny_inference):
    proc = tiny_inference.processor
    inputs = on_device(tiny_inference, proc(tiny_inference.build_prompt("x", has_audio=True), audio=wave(1.0)))
    ids = torch.cat([inputs["input_ids"], torch.tensor([[proc.audio_token_id]], device=tiny_inference.device)], dim=1)
    with pytest.raises(ValueError, match="audio token"):
        tiny_inference.model.embed_inputs(ids, inputs["input_features"], inputs["feature_lengths"])
    with pytest.raises(ValueError, match="placeholder"):
        proc("no placeholder here", audio=wave(1.0))


def test_text_only_prompt_works_and_has_no_audio_tokens(tiny_inference):
    inputs = tiny_inference.prepare("Hello, who are you?")
    assert "input_features" not in inputs
    assert int((inputs["input_ids"] == tiny_inference.processor.audio_token_id).sum()) == 0
    reply = tiny_inference.generate("Hello, who are you?", max_new_tokens=8)
    assert isinstance(reply, str)
    ids = tiny_inference.generate_ids("Hello, who are you?", max_new_tokens=8)
    assert 0 < ids.numel() <= 8


def test_greedy_generate_is_deterministic_and_audio_changes_the_logits(tiny_inference, speech):
    a = tiny_inference.generate_ids("Listen.", audio=speech, max_new_tokens=12)
    b = tiny_inference.generate_ids("Listen.", audio=speech, max_new_tokens=12)
    assert torch.equal(a, b)
    model = tiny_inference.model
    with torch.no_grad():
        with_speech = model(**tiny_inference.prepare("Listen.", audio=speech)).logits[0, -1]
        with_noise = model(**tiny_inference.prepare("Listen.", audio=wave(len(speech) / 16000, seed=5))).logits[0, -1]
    assert not torch.allclose(with_speech, with_noise)


def test_fused_all_layers_differs_from_last_and_one_hot_recovers_it(tiny_inference, speech):
    model = tiny_inference.model
    inputs = tiny_inference.prepare("x", audio=speech)
    with torch.no_grad():
        hidden = model.audio_tower(inputs["input_features"], inputs["feature_lengths"]).hidden_states
        assert hidden.shape[0] == 3
        fused = model.projector.fuse_and_stack(hidden)
        w = model.projector.fusion_weights()
        assert float(w.max()) < 0.99  # not one-hot
        last_only = hidden[-1:].clone()
        from kernels import stack_fuse

        stacked_last = stack_fuse(last_only, torch.ones(1, device=hidden.device), model.config.stack_factor)
        assert not torch.allclose(fused, stacked_last, atol=1e-3)
        expected = sum(w[k] * hidden[k] for k in range(3))
        torch.testing.assert_close(fused[..., :32], expected[:, ::8], rtol=1e-5, atol=1e-5)
        saved = model.projector.layer_logits.detach().clone()
        try:
            model.projector.layer_logits.copy_(torch.tensor([-1e4, -1e4, 0.0]))
            torch.testing.assert_close(model.projector.fuse_and_stack(hidden), stacked_last, rtol=0, atol=1e-6)
        finally:
            model.projector.layer_logits.copy_(saved)


def test_gradients_reach_the_fusion_weights(tiny_checkpoint, speech):
    inference = UltravoxInference(tiny_checkpoint)
    model = inference.model.train()
    inputs = inference.prepare("Listen.", audio=speech)
    labels = inputs["input_ids"].clone()
    out = model(**inputs, labels=labels)
    out.loss.backward()
    grad = model.projector.layer_logits.grad
    assert grad is not None and torch.isfinite(grad).all() and float(grad.abs().sum()) > 0
    assert float(model.projector.linear_1.weight.grad.abs().sum()) > 0


def test_batched_audio_gives_the_same_embeddings_as_single(tiny_inference):
    proc, model = tiny_inference.processor, tiny_inference.model
    a, b = wave(2.3, seed=1), wave(0.9, seed=2)
    with torch.no_grad():
        fa = on_device(tiny_inference, proc.audio_processor([a, b]))
        both = model.audio_embeddings(fa["input_features"], fa["feature_lengths"])
        fb = on_device(tiny_inference, proc.audio_processor(b))
        alone = model.audio_embeddings(fb["input_features"], fb["feature_lengths"])
    torch.testing.assert_close(both[1], alone[0], rtol=1e-4, atol=1e-4)


def test_save_and_reload_gives_identical_logits(tiny_checkpoint, tmp_path, speech):
    first = UltravoxInference(tiny_checkpoint)
    inputs = first.prepare("Listen.", audio=speech)
    with torch.no_grad():
        reference = first.model(**inputs).logits
    out = tmp_path / "copy"
    first.model.save_pretrained(str(out), tokenizer=first.tokenizer)
    assert (out / ENCODER_FILE).is_file() and (out / LLM_DIR / "config.json").is_file()
    again = UltravoxInference(str(out))
    with torch.no_grad():
        assert torch.equal(again.model(**again.prepare("Listen.", audio=speech)).logits, reference)


def test_reference_checkpoint_reloads_from_sources(tiny_checkpoint, tmp_path, speech):
    """self_contained=False keeps only the projector and points at the encoder/LLM sources."""
    base = UltravoxInference(tiny_checkpoint)
    nemo_path, llm_dir = tmp_path / "enc.nemo", tmp_path / "llm"
    base.model.audio_tower.save_nemo(str(nemo_path))
    base.model.language_model.save_pretrained(str(llm_dir))
    base.tokenizer.save_pretrained(str(llm_dir))
    config = UltravoxConfig.from_dict(base.model.config.to_dict())
    config.audio_config._name_or_path = str(nemo_path)
    config.text_model_id = str(llm_dir)
    model = UltravoxModel(config)
    model.projector.load_state_dict(base.model.projector.state_dict())
    out = tmp_path / "ref"
    model.save_pretrained(str(out), tokenizer=base.tokenizer, self_contained=False)
    assert not (out / ENCODER_FILE).exists()
    again = UltravoxInference(str(out))
    inputs = base.prepare("Listen.", audio=speech)
    with torch.no_grad():
        assert torch.equal(again.model(**inputs).logits, base.model(**inputs).logits)


def test_unknown_data_type_and_missing_checkpoint_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="data_type"):
        UltravoxInference(str(tmp_path), data_type="float8")
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        UltravoxModel.from_pretrained(str(tmp_path / "nope"))
