"""The character tokenizer and the tiny model: round trips, save/load, and vLLM-friendly shapes."""

from __future__ import annotations

import torch

from factory.models import build_tiny_model, load_model, load_tokenizer, train_char_tokenizer


def test_char_tokenizer_round_trip_and_specials(tmp_path):
    tok = train_char_tokenizer(["Q: Ann has 3 pens.\nA: 3+4=7. Answer: 7"])
    text = "Q: Bo has 12 cups. He loses 5.\nA: 12-5=7. Answer: 7"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id
    assert len(ids) == len(text) + 1  # one token per character
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.unk_token_id not in ids
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again(text).input_ids == ids
    assert again.padding_side == "left"


def test_tiny_model_saves_and_loads(tmp_path, tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    assert model.config.head_dim >= 32
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    x = torch.tensor([tok("Q: 1+1").input_ids])
    with torch.no_grad():
        assert torch.allclose(model.eval()(x).logits, loaded(x).logits, atol=1e-6)


def test_model_defaults_have_head_dim_32():
    tok = train_char_tokenizer([])
    model = build_tiny_model(
        tok, hidden_size=128, num_layers=1, num_heads=4, intermediate_size=64, max_position_embeddings=64
    )
    assert model.config.head_dim == 32


def test_missing_model_folder_is_a_clear_error(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="model folder not found"):
        load_model(tmp_path / "nope")
