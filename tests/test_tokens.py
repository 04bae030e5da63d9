"""One BOS per prompt and every end-of-completion id (factory/tokens.py), on locally built tokenizers."""

from __future__ import annotations

import json

from factory.models import train_char_tokenizer
from factory.tokens import completion_end_ids, encode_prompt, stop_token_ids, turn_end_token

# A Llama-3-like template: it writes the BOS itself and closes turns with a special token of its own.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eot|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _chat_tokenizer():
    tokenizer = train_char_tokenizer(["Q: Ann has 3 pens.\nA: Answer: 3"])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|eot|>"]})
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def test_a_rendered_chat_prompt_gets_one_bos_not_two():
    tokenizer = _chat_tokenizer()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert tokenizer(prompt).input_ids[:2] == [tokenizer.bos_token_id] * 2  # what plain tokenizing does
    ids = encode_prompt(tokenizer, prompt)
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    # A plain prompt still gets the tokenizer's BOS.
    assert encode_prompt(tokenizer, "Q: hi\nA: ")[0] == tokenizer.bos_token_id


def test_every_end_of_turn_id_stops_a_completion(tmp_path):
    tokenizer = _chat_tokenizer()
    eot = tokenizer.convert_tokens_to_ids("<|eot|>")
    assert turn_end_token(tokenizer) == "<|eot|>"
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    assert stop_token_ids(tokenizer, tmp_path) == sorted({tokenizer.eos_token_id, eot, 5, 7})
    assert stop_token_ids(tokenizer) == sorted({tokenizer.eos_token_id, eot})


def test_chat_completions_end_with_the_turn_token_plain_ones_with_eos():
    tokenizer = _chat_tokenizer()
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    eot = tokenizer.convert_tokens_to_ids("<|eot|>")
    assert completion_end_ids(tokenizer, [chat, "Q: hi\nA: "]) == [eot, tokenizer.eos_token_id]
    plain = train_char_tokenizer(["abc"])  # no chat template at all
    assert turn_end_token(plain) is None
    assert completion_end_ids(plain, ["Q: hi\nA: "]) == [plain.eos_token_id]
