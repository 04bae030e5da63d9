"""M-step data: prompt/completion pairs -> token ids with the prompt masked out of the loss.

One optimizer step consumes one *global batch*: ``global_batch_size`` consecutive items of a fixed, seeded
index stream (``CyclingSampler``). ``StepBatchSampler`` cuts each global batch into the micro-batches of
every rank (data parallel) and of every gradient-accumulation round, so the samples that make up step s
do not depend on the number of devices or on the accumulation, and a resumed run starts at the right
place in the stream. Each micro-batch also carries the number of loss tokens in its whole global batch,
so the loss is the mean over the global batch's tokens however it is split.

Tokenization keeps every completion whole (answer and end token included) and cuts over-long prompts from
the left, keeping their BOS; a pair whose completion alone does not fit is dropped, and counted
(:func:`tokenize_pairs`).
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from factory.tokens import completion_end_ids, encode_prompt

IGNORE_INDEX = -100  # label value that transformers' causal-LM loss skips


def tokenize_example(
    tokenizer, prompt: str, completion: str, *, max_length: int, end_id: int | None = None
) -> dict | None:
    """Tokenizes one pair; only completion tokens (and the closing end token) carry labels.

    The prompt is encoded with exactly one BOS (:func:`factory.tokens.encode_prompt`: a rendered chat
    template already holds it) and the completion ends with ``end_id`` (default: the tokenizer's EOS; see
    :func:`factory.tokens.completion_end_ids` for chat prompts). A pair longer than ``max_length`` loses the
    START of its prompt (the BOS at position 0 is kept): the completion, its answer and its end token are
    what the loss is about, and they are never cut.

    Returns:
        ``{"input_ids", "labels", "prompt_truncated"}``, or None when the completion and its end token leave
        no room for the prompt's last token (and its BOS): such a pair cannot be trained on.
    """
    prompt_ids = encode_prompt(tokenizer, prompt)
    end = tokenizer.eos_token_id if end_id is None else end_id
    completion_ids = list(tokenizer(completion, add_special_tokens=False).input_ids) + [int(end)]
    head = prompt_ids[:1] if prompt_ids and prompt_ids[0] == tokenizer.bos_token_id else []
    room = max_length - len(completion_ids)  # tokens left for the prompt
    # The BOS plus at least one prompt token, so the completion's first token is predicted from its prompt.
    if room < len(head) + (len(prompt_ids) > len(head)):
        return None
    truncated = len(prompt_ids) > room
    if truncated:
        prompt_ids = head + prompt_ids[len(prompt_ids) - (room - len(head)) :]
    return {
        "input_ids": prompt_ids + completion_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids,
        "prompt_truncated": truncated,
    }


def tokenize_pairs(tokenizer, pairs: list[dict], *, max_length: int) -> tuple[list[dict], dict]:
    """Tokenizes ``pairs`` (:func:`tokenize_example`), dropping those that cannot be trained on.

    Args:
        tokenizer: the model's tokenizer.
        pairs: dicts with ``prompt`` and ``completion``.
        max_length: tokens per example (``trainer.max_seq_len``, capped by the model's positions).

    Returns:
        The kept examples (``input_ids``, ``labels``) and their counts: ``num_pairs`` (given),
        ``num_examples`` (kept), ``num_prompts_truncated`` (kept with the prompt's start cut),
        ``num_dropped_too_long`` (the completion alone does not fit) and ``num_dropped_no_loss_tokens``.

    Raises:
        ValueError: no pairs, or none left to train on (naming ``trainer.max_seq_len``).
    """
    if not pairs:
        raise ValueError("no training examples: refusing to fine-tune on an empty dataset")
    ends = completion_end_ids(tokenizer, [p["prompt"] for p in pairs])
    examples: list[dict] = []
    stats = {"num_pairs": len(pairs), "num_prompts_truncated": 0, "num_dropped_too_long": 0}
    stats["num_dropped_no_loss_tokens"] = 0
    for pair, end in zip(pairs, ends, strict=True):
        example = tokenize_example(
            tokenizer, pair["prompt"], pair["completion"], max_length=max_length, end_id=end
        )
        if example is None:
            stats["num_dropped_too_long"] += 1
        elif num_loss_tokens(example) == 0:  # an empty prompt and completion: no target (a NaN mean loss)
            stats["num_dropped_no_loss_tokens"] += 1
        else:
            stats["num_prompts_truncated"] += example.pop("prompt_truncated")
            examples.append(example)
    stats["num_examples"] = len(examples)
    if not examples:
        raise ValueError(
            f"no training examples left: all {len(pairs)} pairs were dropped "
            f"({stats['num_dropped_too_long']} completions longer than max_seq_len={max_length} tokens with "
            f"their end token, {stats['num_dropped_no_loss_tokens']} with no loss tokens); raise "
            "trainer.max_seq_len (it is also capped by the model's max_position_embeddings)"
        )
    return examples, stats


def num_loss_tokens(example: dict) -> int:
    """Tokens of ``example`` the next-token loss counts (the first token is never a target)."""
    return sum(label != IGNORE_INDEX for label in example["labels"][1:])


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


def collate_packed(examples: list[dict]) -> dict:
    """Concatenates a batch into one row with no padding; position ids restart at 0 for each sample.

    transformers (``masking_utils.find_packed_sequence_indices``) reads the position-id resets, when
    neither an attention mask nor a KV cache is given (call the model with ``use_cache=False``), as
    sample boundaries and builds a block-diagonal causal mask (sdpa, eager,
    flex) or variable-length attention (flash-attention), so no token attends across samples. Each
    sample's first label is masked: the previous sample's last token must not learn to predict it (an
    unpacked batch never uses a row's first label either), so the loss equals the unpacked loss.
    """
    input_ids, labels, position_ids = [], [], []
    for e in examples:
        input_ids += e["input_ids"]
        labels += [IGNORE_INDEX] + list(e["labels"][1:])
        position_ids += range(len(e["input_ids"]))
    return {
        "input_ids": torch.tensor([input_ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([position_ids], dtype=torch.long),
    }


def num_steps(*, max_steps: int, epochs: float | None, num_examples: int, global_batch_size: int) -> int:
    """Optimizer steps of an M-step: ``max_steps``, or with ``epochs`` set
    ``ceil(epochs x num_examples / global_batch_size)`` capped at ``max_steps`` (a bound on the time a large
    snapshot takes; raise it to train every epoch)."""
    if epochs is None:
        return max_steps
    return max(1, min(max_steps, math.ceil(epochs * num_examples / global_batch_size)))


class CyclingSampler(Sampler[int]):
    """Yields ``total`` indices from successive seeded permutations (one pass = one M-step run).

    A fixed-length stream makes the step budget decide how long training takes: ``trainer.max_steps``
    gives a 300-sample snapshot and a 30,000-sample one the same number of updates, ``trainer.epochs``
    sizes the budget by the snapshot (:func:`num_steps`); either way a pass may end mid-permutation.
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


class StepBatchSampler(Sampler[list]):
    """This rank's micro-batches of the step stream: ``max_steps`` global batches of ``CyclingSampler``.

    Global batch s is items ``[s*G, (s+1)*G)`` of the stream; rank r takes its contiguous ``G / world``
    share, served as ``accumulate`` micro-batches of ``micro_batch_size``. Each yielded item is
    ``(index, loss tokens in the whole global batch)``. ``start_step`` skips the steps a resumed run has
    already taken; ``len()`` stays the whole run's count, as Lightning's restored batch counter expects.
    """

    def __init__(
        self,
        loss_tokens: list[int],
        *,
        max_steps: int,
        global_batch_size: int,
        micro_batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
    ):
        share, rest = divmod(global_batch_size, micro_batch_size * world_size)
        if rest or share < 1:
            raise ValueError(
                f"config error: trainer.global_batch_size={global_batch_size} must be a multiple of "
                f"trainer.batch_size x devices x nodes = {micro_batch_size} x {world_size}"
            )
        self.loss_tokens = loss_tokens
        self.max_steps = max_steps
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.accumulate = share
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_step = start_step

    def __len__(self) -> int:
        return self.max_steps * self.accumulate

    def __iter__(self):
        stream = list(
            CyclingSampler(
                len(self.loss_tokens), total=self.max_steps * self.global_batch_size, seed=self.seed
            )
        )
        g, b = self.global_batch_size, self.micro_batch_size
        for step in range(self.start_step, self.max_steps):
            batch = stream[step * g : (step + 1) * g]
            tokens = sum(self.loss_tokens[i] for i in batch)
            mine = batch[self.rank * (g // self.world_size) : (self.rank + 1) * (g // self.world_size)]
            for k in range(self.accumulate):
                yield [(i, tokens) for i in mine[k * b : (k + 1) * b]]


class _TokenizedPairs(Dataset):
    """Indexed by ``(index, global loss tokens)``; the count travels with the example to the collate."""

    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, tokens = key
        return {**self.examples[index], "global_loss_tokens": tokens}


class PromptCompletionDataModule(L.LightningDataModule):
    """Serves the step stream's micro-batches of tokenized prompt/completion pairs (prompt tokens masked).

    Args:
        examples: :func:`tokenize_pairs`' examples (``input_ids``, ``labels``).
        pad_token_id: the padding id of unpacked batches.
        batch_size: micro-batch size per device.
        max_steps: optimizer steps (global batches) in the stream.
        global_batch_size: samples per optimizer step over all devices and accumulation rounds
            (``None``: ``batch_size`` x the number of devices, no accumulation).
        packing: concatenate each micro-batch into one unpadded row (``collate_packed``).
        seed: seeds the stream's permutations.
    """

    def __init__(
        self,
        examples: list[dict],
        *,
        pad_token_id: int,
        batch_size: int,
        max_steps: int,
        global_batch_size: int | None = None,
        packing: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        if not examples:
            raise ValueError("no training examples: refusing to fine-tune on an empty dataset")
        self.examples = examples
        self.pad_token_id = pad_token_id
        self.batch_size = batch_size
        self.max_steps = max_steps
        self.global_batch_size = global_batch_size
        self.packing = packing
        self.seed = seed

    def batch_sampler(self, *, rank: int = 0, world_size: int = 1, start_step: int = 0) -> StepBatchSampler:
        """The micro-batches of ``rank`` from ``start_step`` on."""
        return StepBatchSampler(
            [num_loss_tokens(e) for e in self.examples],
            max_steps=self.max_steps,
            global_batch_size=self.global_batch_size or self.batch_size * world_size,
            micro_batch_size=self.batch_size,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            start_step=start_step,
        )

    def collate(self, examples: list[dict]) -> dict:
        tokens = examples[0]["global_loss_tokens"]
        batch = (
            collate_packed(examples) if self.packing else collate(examples, pad_token_id=self.pad_token_id)
        )
        return {**batch, "global_loss_tokens": torch.tensor(tokens)}

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        sampler = self.batch_sampler(
            rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1,
            # On a resumed fit Lightning has restored global_step before it asks for the data.
            start_step=trainer.global_step if trainer else 0,
        )
        return DataLoader(_TokenizedPairs(self.examples), batch_sampler=sampler, collate_fn=self.collate)
