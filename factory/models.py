"""Models and tokenizers: the tiny character-level Llama built from a config, and loading by name/path."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
# Every printable ASCII character plus newline: the tokenizer never maps task text to <unk>.
ALPHABET = sorted(set(string.printable) - set("\t\r\x0b\x0c"))


def train_char_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    """Trains a character-level tokenizer (BPE with no merges) and wraps it for transformers.

    The vocabulary is printable ASCII plus any other character seen in ``corpus``; ``<s>`` is prepended
    to every encoded text, ``</s>`` ends completions.
    """
    from tokenizers import Tokenizer, decoders, models, processors, trainers

    alphabet = sorted(set(ALPHABET) | {ch for text in corpus for ch in text})
    specials = [PAD, BOS, EOS, UNK]
    tok = Tokenizer(models.BPE(unk_token=UNK))
    # vocab_size == alphabet + specials leaves no room for merges: one token per character.
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + len(specials),
        initial_alphabet=alphabet,
        special_tokens=specials,
        show_progress=False,
    )
    tok.train_from_iterator(corpus or [""], trainer=trainer)
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    max_position_embeddings: int,
    seed: int = 0,
) -> LlamaForCausalLM:
    """Builds a randomly initialised Llama-style causal LM sized for the tokenizer."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        head_dim=hidden_size // num_heads,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        rope_theta=10000.0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def load_tokenizer(path: str | Path):
    """Loads a tokenizer by Hub name or folder, left-padded for batched generation."""
    tokenizer = _from_pretrained(AutoTokenizer, path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str | Path, *, dtype: str = "float32"):
    """Loads a causal LM by Hub name or folder; a missing local folder is a clear error."""
    path_str = str(path)
    if (path_str.startswith((".", "/", "~")) or Path(path_str).exists()) and not Path(path_str).is_dir():
        raise FileNotFoundError(_missing_folder(path_str))
    return _from_pretrained(AutoModelForCausalLM, path_str, dtype=getattr(torch, dtype))


def _missing_folder(path_str: str) -> str:
    """The one-line error for a missing local model folder, naming the fetch command when there is one."""
    from factory.fetch_model import fetch_hint

    return f"model folder not found: {path_str} (check model.name_or_path{fetch_hint(path_str)})"


def _from_pretrained(cls, path: str | Path, **kwargs):
    """``cls.from_pretrained`` with a missing model named in one line (transformers raises OSError)."""
    path_str = str(path)
    if path_str.startswith((".", "/", "~")) and not Path(path_str).expanduser().is_dir():
        raise FileNotFoundError(_missing_folder(path_str))
    try:
        return cls.from_pretrained(path_str, **kwargs)
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(
            f"model {path_str!r} not found: not a local folder with a saved model, and not loadable from "
            f"the Hugging Face Hub ({first}); check model.name_or_path"
        ) from err
