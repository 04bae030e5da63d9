"""M-step data: prompt/completion pairs -> token ids with the prompt masked out of the loss."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

IGNORE_INDEX = -100  # label value that transformers' causal-LM loss skips


def tokenize_example(tokenizer, prompt: str, completion: str, *, max_length: int) -> dict:
    """Tokenizes one pair; only completion tokens (and the closing EOS) carry labels."""
    prompt_ids = tokenizer(prompt).input_ids
    completion_ids = tokenizer(completion, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + completion_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def collate(examples: list[dict], *, pad_token_id: int) -> dict:
    """Right-pads a batch; padding is masked in attention and in the loss."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class CyclingSampler(Sampler[int]):
    """Yields ``total`` indices from successive seeded permutations (one pass = one M-step run).

    A fixed-length stream makes the step budget, not the dataset size, decide how long training takes, so
    a 300-sample snapshot and a 30,000-sample one get the same number of updates.
    """

    def __init__(self, num_items: int, *, total: int, seed: int):
        self.num_items = num_items
        self.total = total
        self.seed = seed

    def __len__(self) -> int:
        return self.total

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        emitted = 0
        while emitted < self.total:
            for index in torch.randperm(self.num_items, generator=generator).tolist():
                if emitted == self.total:
                    return
                yield index
                emitted += 1


class PromptCompletionDataModule(L.LightningDataModule):
    """Serves shuffled, padded batches of prompt/completion pairs (prompt tokens masked)."""

    def __init__(
        self,
        tokenizer,
        pairs: list[dict],
        *,
        batch_size: int,
        max_steps: int,
        seed: int = 0,
        max_length: int = 512,
    ):
        super().__init__()
        if not pairs:
            raise ValueError("no training examples: refusing to fine-tune on an empty dataset")
        self.tokenizer = tokenizer
        self.pairs = pairs
        self.batch_size = batch_size
        self.max_steps = max_steps
        self.seed = seed
        self.max_length = max_length
        self.examples: list[dict] = []

    def setup(self, stage: str | None = None) -> None:
        if not self.examples:
            self.examples = [
                tokenize_example(self.tokenizer, p["prompt"], p["completion"], max_length=self.max_length)
                for p in self.pairs
            ]

    def train_dataloader(self) -> DataLoader:
        pad = self.tokenizer.pad_token_id
        return DataLoader(
            self.examples,
            batch_size=self.batch_size,
            sampler=CyclingSampler(
                len(self.examples), total=self.max_steps * self.batch_size, seed=self.seed
            ),
            collate_fn=lambda batch: collate(batch, pad_token_id=pad),
        )
