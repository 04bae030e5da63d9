"""E-step: sample K completions per problem with the current policy and write parquet shards.

Command: ``restem-sample iteration=2`` samples the training problems with ``iter_1/model``.
Shards are the unit of resume: a rerun after a crash keeps finished shards and generates only the rest.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import time
from pathlib import Path

import polars as pl
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from factory.config import hydra_entry
from factory.faults import kill_point
from factory.rundir import STAGE_FILE, mark_done

log = logging.getLogger(__name__)

SAMPLE_SCHEMA = {
    "problem_id": pl.String,
    "sample_idx": pl.Int32,
    "prompt": pl.String,
    "completion": pl.String,
    "num_tokens": pl.Int32,
    "finish_reason": pl.String,
    "policy": pl.String,
    "seed": pl.Int64,
}


def derive_seed(*parts: object) -> int:
    """A stable 31-bit seed from any parts (Python's hash() is salted per process)."""
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    num_samples: int,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    desc: str = "sampling",
    progress: bool = True,
    share_prefix: bool = True,
) -> list[list[dict]]:
    """Samples ``num_samples`` completions for each prompt with transformers' ``generate``.

    Prompts are batched by length (less padding); ``temperature == 0`` means greedy decoding.

    Returns:
        For each prompt (input order), ``num_samples`` dicts with ``completion``, ``num_tokens`` and
        ``finish_reason`` ("stop" when the model ended with EOS, "length" when cut at max_new_tokens).
    """
    model.eval()
    greedy = temperature == 0
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[dict]] = [[] for _ in prompts]
    eos = tokenizer.eos_token_id
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress, leave=False)
    for batch_no, start in enumerate(range(0, len(order), batch_size)):
        idx = order[start : start + batch_size]
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True)
        enc = {k: v.to(model.device) for k, v in enc.items()}
        torch.manual_seed(derive_seed(seed, batch_no))
        kwargs = (
            {"do_sample": False}
            if greedy
            else {
                "do_sample": True,
                "temperature": temperature,
                "top_k": top_k or None,
                "top_p": top_p,
            }
        )
        if greedy or num_samples == 1 or not share_prefix or enc["input_ids"].shape[1] < 2:
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                num_return_sequences=1 if greedy else num_samples,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos,
                **kwargs,
            )
        else:
            out = _generate_shared_prefix(
                model,
                enc,
                num_samples=num_samples,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos,
                **kwargs,
            )
        new = out[:, enc["input_ids"].shape[1] :].tolist()
        per_prompt = 1 if greedy else num_samples
        for row, ids in enumerate(new):
            n = ids.index(eos) if eos in ids else len(ids)
            results[idx[row // per_prompt]].append(
                {
                    "completion": tokenizer.decode(ids[:n], skip_special_tokens=True),
                    "num_tokens": n,
                    "finish_reason": "stop" if n < len(ids) else "length",
                }
            )
        bar.update(len(idx))
    bar.close()
    return results


def _generate_shared_prefix(model, enc: dict, *, num_samples: int, **generate_kwargs) -> torch.Tensor:
    """``generate`` for K samples per prompt, computing each prompt's KV cache once instead of K times.

    The prompt (minus its last token) is prefilled once per prompt, the cache is repeated K times, and
    generation continues from it: the same samples as ``num_return_sequences=K`` with about K times less
    prefill work (measured ~1.5x more new tokens/s on the tiny model).
    """
    from transformers import DynamicCache

    ids, mask = enc["input_ids"], enc["attention_mask"]
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding: positions start at each prompt
    cache = DynamicCache(config=model.config)
    # transformers renamed `past_key_values` to `cache` (5.2x); use whichever this version's forward takes.
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    model(
        input_ids=ids[:, :-1],
        attention_mask=mask[:, :-1],
        position_ids=positions[:, :-1],
        use_cache=True,
        **{cache_kw: cache},
    )
    cache.batch_repeat_interleave(num_samples)
    return model.generate(
        input_ids=ids.repeat_interleave(num_samples, dim=0),
        attention_mask=mask.repeat_interleave(num_samples, dim=0),
        num_return_sequences=1,
        **{cache_kw: cache},
        **generate_kwargs,
    )


def sample_problems(
    *,
    model,
    tokenizer,
    task,
    problems: list[dict],
    out_dir: Path,
    settings: DictConfig,
    policy: str,
    iteration: int,
) -> dict:
    """Samples every problem into ``out_dir/shard-*.parquet``, resuming finished shards.

    Shards are written to ``<out_dir>``'s hidden ``.partial`` sibling; the folder is renamed into place
    with its ``stage.json`` only when every shard exists.
    """
    start = time.time()
    out_dir = Path(out_dir)
    work = out_dir.with_name(f".{out_dir.name}.partial")
    work.mkdir(parents=True, exist_ok=True)
    size = int(settings.shard_size)
    shards = [problems[i : i + size] for i in range(0, len(problems), size)]
    generated = 0
    for shard_no, shard in enumerate(tqdm(shards, desc=f"E-step iter {iteration} shards", unit="shard")):
        path = work / f"shard-{shard_no:05d}.parquet"
        if path.exists():
            continue  # finished before a crash or stop: never regenerate
        seed = derive_seed(settings.seed, iteration, shard_no)
        prompts = [task.format_prompt(p, tokenizer=tokenizer) for p in shard]
        samples = generate(
            model,
            tokenizer,
            prompts,
            num_samples=int(settings.num_samples),
            temperature=float(settings.temperature),
            top_k=int(settings.top_k),
            top_p=float(settings.top_p),
            max_new_tokens=int(settings.max_new_tokens),
            batch_size=int(settings.batch_size),
            seed=seed,
            desc=f"shard {shard_no}",
        )
        kill_point("sample.shard")
        rows = [
            {
                "problem_id": p["problem_id"],
                "sample_idx": j,
                "prompt": prompt,
                **s,
                "policy": policy,
                "seed": seed,
            }
            for p, prompt, per_problem in zip(shard, prompts, samples, strict=True)
            for j, s in enumerate(per_problem)
        ]
        tmp = path.with_suffix(".parquet.tmp")
        pl.DataFrame(rows, schema=SAMPLE_SCHEMA).write_parquet(tmp)
        os.replace(tmp, path)
        generated += len(rows)
    num_rows = sum(
        pl.scan_parquet(p).select(pl.len()).collect().item() for p in sorted(work.glob("*.parquet"))
    )
    mark_done(
        work,
        seconds=time.time() - start,
        num_problems=len(problems),
        num_samples=num_rows,
        num_shards=len(shards),
        policy=policy,
    )
    os.replace(work, out_dir)
    return {"num_samples": num_rows, "generated": generated, "seconds": time.time() - start}


def policy_path(run_dir, base_path, iteration: int):
    """The policy that samples iteration k: the newest trained model before k (p_{k-1}), else the base.

    An iteration whose snapshot was empty trains no model; the next one samples with the same policy.
    """
    for j in range(iteration - 1, 0, -1):
        if run_dir.is_done(j, "model"):
            return run_dir.stage(j, "model")
    return base_path


def run(cfg: DictConfig) -> dict:
    """Samples the training problems of ``iteration`` with the previous iteration's policy."""
    from factory.base_model import ensure_base_model
    from factory.models import load_model, load_tokenizer
    from factory.rundir import RunDir
    from factory.tasks import build_task

    run_dir = RunDir(cfg.paths.run_dir)
    k = int(cfg.iteration)
    out = run_dir.stage(k, "samples")
    if (out / STAGE_FILE).exists():
        return {"skipped": str(out)}
    policy = policy_path(run_dir, ensure_base_model(cfg), k)
    task = build_task(cfg.task, data_dir=cfg.paths.data_dir)
    return sample_problems(
        model=load_model(policy, dtype=cfg.model.dtype),
        tokenizer=load_tokenizer(policy),
        task=task,
        problems=task.load_problems(split="train"),
        out_dir=out,
        settings=cfg.sampler,
        policy=str(policy),
        iteration=k,
    )


main = hydra_entry(run)
