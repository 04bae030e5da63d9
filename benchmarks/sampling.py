"""E-step throughput of the sampling backends side by side: HF (our decode loop), vLLM, and plain
transformers ``generate`` as the reference, in one run on the same prompts.

Run (``make bench``):
    .venv/bin/python benchmarks/sampling.py                      # the demo's E-step on CPU
    .venv/bin/python benchmarks/sampling.py --problems 2000      # the whole demo E-step (2,000 x 8)
    .venv/bin/python benchmarks/sampling.py --gpu                # Qwen2.5-0.5B-shaped random model, CUDA
The CPU mode samples the demo's training problems with its cached base model (T=0.8, top-k 40, 64 new
tokens); ``--gpu`` samples 256 random 128-token prompts, 256 new tokens each, with a randomly initialised
model of Qwen2.5-0.5B's shape (no download). vLLM's start-up (a child process loading the model) is
timed apart from its generation. Record results in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch


def demo_workload(args):
    """The demo's base model and the first ``args.problems`` training prompts."""
    from factory.base_model import ensure_base_model
    from factory.config import compose
    from factory.models import load_model, load_tokenizer
    from factory.sample import problem_seed
    from factory.tasks import build_task

    cfg = compose()
    path = ensure_base_model(cfg)
    tok = load_tokenizer(path)
    task = build_task(cfg.task, data_dir=cfg.paths.data_dir)
    problems = task.load_problems(split="train")[: args.problems]
    prompts = [task.format_prompt(p, tokenizer=tok) for p in problems]
    seeds = [problem_seed(0, p["problem_id"]) for p in problems]
    sampling = {"temperature": 0.8, "top_k": 40, "top_p": 1.0, "max_new_tokens": 64}
    return path, load_model(path), tok, prompts, seeds, sampling, "float32"


def gpu_workload(args):
    """A Qwen2.5-0.5B-shaped model with random weights and a 151,936-word tokenizer, saved to a folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    vocab = 151936
    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="t1", pad_token="t0", padding_side="left"
    )
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=True, eos_token_id=1, pad_token_id=0, bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    path = Path(tempfile.mkdtemp(prefix="qwen-shaped-"))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    gen = torch.Generator().manual_seed(0)
    prompts = [
        " ".join(f"t{i}" for i in torch.randint(2, vocab, (args.prompt_tokens,), generator=gen).tolist())
        for _ in range(args.problems)
    ]
    sampling = {"temperature": 0.8, "top_k": 40, "top_p": 1.0, "max_new_tokens": args.new_tokens}
    return path, model.to("cuda"), tok, prompts, list(range(len(prompts))), sampling, "bfloat16"


def time_hf(model, tok, prompts, seeds, sampling, *, samples, batch_size):
    from factory.sample import generate

    start = time.perf_counter()
    out = generate(
        model, tok, prompts, num_samples=samples, batch_size=batch_size, seeds=seeds, progress=False,
        **sampling,
    )  # fmt: skip
    _sync()
    return sum(s["num_tokens"] for per in out for s in per), time.perf_counter() - start


def time_plain_generate(model, tok, prompts, sampling, *, samples, batch_size, static):
    """transformers ``generate`` with ``num_return_sequences`` (and optionally a static cache)."""
    eos = tok.eos_token_id
    start, tokens = time.perf_counter(), 0
    for i in range(0, len(prompts), batch_size):
        enc = tok(prompts[i : i + batch_size], return_tensors="pt", padding=True).to(model.device)
        extra = {"cache_implementation": "static"} if static else {}
        with torch.inference_mode():
            out = model.generate(
                **enc, do_sample=True, num_return_sequences=samples, pad_token_id=tok.pad_token_id,
                eos_token_id=eos, temperature=sampling["temperature"], top_k=sampling["top_k"],
                max_new_tokens=sampling["max_new_tokens"], **extra,
            )  # fmt: skip
        for row in out[:, enc["input_ids"].shape[1] :].tolist():
            tokens += row.index(eos) if eos in row else len(row)
    _sync()
    return tokens, time.perf_counter() - start


def time_vllm(path, tok, prompts, seeds, sampling, *, samples, dtype):
    from omegaconf import OmegaConf

    from factory.config import VllmSamplerConfig
    from factory.sample import open_vllm

    settings = OmegaConf.structured(VllmSamplerConfig(dtype=dtype))
    start = time.perf_counter()
    with open_vllm(path, tokenizer=tok, settings=settings) as vllm:
        startup = time.perf_counter() - start
        start = time.perf_counter()
        out = vllm.generate(prompts, num_samples=samples, seeds=seeds, **sampling)
        seconds = time.perf_counter() - start
    return sum(s["num_tokens"] for per in out for s in per), seconds, startup


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=None, help="prompts (default 256)")
    parser.add_argument("--samples", type=int, default=None, help="samples per prompt (CPU 8, GPU 1)")
    parser.add_argument("--batch-size", type=int, default=None, help="HF prompts per call (CPU 16, GPU 256)")
    parser.add_argument("--backends", default="hf,vllm,generate", help="comma list of hf, vllm, generate")
    parser.add_argument("--gpu", action="store_true", help="Qwen2.5-0.5B-shaped random model on CUDA")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="--gpu: prompt length")
    parser.add_argument("--new-tokens", type=int, default=256, help="--gpu: new tokens per sequence")
    args = parser.parse_args()
    args.problems = args.problems or 256
    samples = args.samples or (1 if args.gpu else 8)
    batch = args.batch_size or (256 if args.gpu else 16)
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("error: --gpu needs a CUDA device")
    path, model, tok, prompts, seeds, sampling, dtype = (gpu_workload if args.gpu else demo_workload)(args)
    device = torch.cuda.get_device_name() if args.gpu else platform.processor() or platform.machine()
    print(f"device: {device}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{len(prompts)} prompts x {samples} samples, {sampling}, HF batch {batch} prompts")
    rows = []
    for backend in args.backends.split(","):
        if backend == "hf":
            tokens, seconds = time_hf(model, tok, prompts, seeds, sampling, samples=samples, batch_size=batch)
            rows.append(("hf (factory.sampling.hf)", tokens, seconds, None))
        elif backend == "generate":
            static = args.gpu  # the GPU reference: plain generate with a static cache
            tokens, seconds = time_plain_generate(
                model, tok, prompts, sampling, samples=samples, batch_size=batch, static=static
            )
            rows.append(
                (f"transformers generate{' (static cache)' if static else ''}", tokens, seconds, None)
            )
        elif backend == "vllm":
            tokens, seconds, startup = time_vllm(
                path, tok, prompts, seeds, sampling, samples=samples, dtype=dtype
            )
            rows.append(("vllm", tokens, seconds, startup))
        else:
            raise SystemExit(f"error: unknown backend {backend!r}; use hf, vllm, generate")
    hf_rate = next((t / s for name, t, s, _ in rows if name.startswith("hf")), None)
    print("\n| backend | new tokens | seconds | tok/s | vs hf | start-up (s) |\n|---|---|---|---|---|---|")
    for name, tokens, seconds, startup in rows:
        ratio = f"{tokens / seconds / hf_rate:.2f}x" if hf_rate else "-"
        start = f"{startup:.1f}" if startup is not None else "-"
        print(f"| {name} | {tokens:,} | {seconds:.1f} | {tokens / seconds:,.0f} | {ratio} | {start} |")


if __name__ == "__main__":
    main()
