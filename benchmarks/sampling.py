"""E-step throughput of the sampling backends side by side: HF (our decode loop), vLLM, and the plain
libraries as references (transformers ``generate``, ``vllm.LLM.generate``), in one run on the same prompts.

Run (``make bench``):
    .venv/bin/python benchmarks/sampling.py                      # the demo's E-step on CPU
    .venv/bin/python benchmarks/sampling.py --problems 10000 --samples 2 --batch-size 32 --workers 2
        # the demo's E-step sizes (10,000 x 2, 32 prompts per call, 2 processes; at T=0.8, the demo's is 1.0)
    .venv/bin/python benchmarks/sampling.py --model /work/models/SmolLM2-135M-Instruct   # a real model
    .venv/bin/python benchmarks/sampling.py --gpu                # Qwen2.5-0.5B-shaped random model, CUDA
The CPU mode samples the demo's training problems with its cached base model (T=0.8, top-k 40, 64 new
tokens). ``--model`` samples GSM8K training problems as chat prompts with a real checkpoint (default 32
problems x 4 samples, up to 256 new tokens, T=0.8, top-k 40, the model's end-of-turn ids) and adds the
``vllm-plain`` reference; ``--batch-size`` and ``--generate-batch-sizes`` take comma lists of prompts per
call for our loop and for transformers ``generate`` (each at its fastest size is what the ratio compares);
``--workers N`` adds our loop spread over N processes (``sampler.workers=N``). ``--gpu`` samples 256
random 128-token prompts, 256 new tokens each, with a randomly initialised model of Qwen2.5-0.5B's shape
(no download). vLLM engines start in processes of
their own before the first round; their start-up is timed apart and excluded from tok/s. ``--rounds N``
runs every backend N times, alternating their order, so that a shared machine's drifting load hits all
of them alike. Record results in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import multiprocessing
import platform
import tempfile
import time
from pathlib import Path

import torch


@dataclasses.dataclass
class Workload:
    path: Path  # the model folder (what vLLM loads)
    model: object
    tok: object
    prompts: list[str]
    seeds: list[int]
    sampling: dict  # temperature, top_k, top_p, max_new_tokens
    dtype: str
    stop: list[str] = dataclasses.field(default_factory=list)
    stop_ids: list[int] = dataclasses.field(default_factory=list)


def demo_workload(args) -> Workload:
    """The demo's base model and the first ``args.problems`` training prompts."""
    from factory.base_model import ensure_base_model
    from factory.config import compose
    from factory.models import load_model, load_tokenizer
    from factory.sample import problem_seed
    from factory.sampling.completions import task_stop_strings
    from factory.tasks import build_task
    from factory.tokens import stop_token_ids

    cfg = compose(["experiment=arith_demo"])
    path = ensure_base_model(cfg)
    tok = load_tokenizer(path)
    task = build_task(cfg.task, data_dir=cfg.paths.data_dir)
    problems = task.load_problems(split="train")[: args.problems or 256]
    return Workload(
        path=path,
        model=load_model(path),
        tok=tok,
        prompts=[task.format_prompt(p, tokenizer=tok) for p in problems],
        seeds=[problem_seed(0, p["problem_id"]) for p in problems],
        sampling={"temperature": 0.8, "top_k": 40, "top_p": 1.0, "max_new_tokens": 64},
        dtype="float32",
        stop=task_stop_strings(task),
        stop_ids=stop_token_ids(tok, path),
    )


def real_workload(args) -> Workload:
    """A real checkpoint (``args.model``) on GSM8K training problems, as chat prompts."""
    from factory.config import compose
    from factory.models import load_tokenizer
    from factory.sample import problem_seed
    from factory.sampling.completions import task_stop_strings
    from factory.sampling.hf import load_policy
    from factory.tasks import build_task
    from factory.tokens import stop_token_ids

    path = Path(args.model)
    tok = load_tokenizer(path)
    cfg = compose(["task=gsm8k", "task.prompt_style=chat"])
    task = build_task(cfg.task, data_dir=cfg.paths.data_dir)
    problems = task.load_problems(split="train")[: args.problems or 32]
    return Workload(
        path=path,
        model=load_policy(path, dtype="float32"),
        tok=tok,
        prompts=[task.format_prompt(p, tokenizer=tok) for p in problems],
        seeds=[problem_seed(0, p["problem_id"]) for p in problems],
        sampling={"temperature": 0.8, "top_k": 40, "top_p": 1.0, "max_new_tokens": args.new_tokens or 256},
        dtype="float32",
        stop=task_stop_strings(task),  # chat prompts: none; the end-of-turn id ends a completion
        stop_ids=stop_token_ids(tok, path),
    )


def gpu_workload(args) -> Workload:
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
        for _ in range(args.problems or 256)
    ]
    sampling = {"temperature": 0.8, "top_k": 40, "top_p": 1.0, "max_new_tokens": args.new_tokens or 256}
    return Workload(path, model.to("cuda"), tok, prompts, list(range(len(prompts))), sampling, "bfloat16",
                    stop_ids=[1])  # fmt: skip


def _count(rows: list[list[int]], stop_ids: list[int]) -> int:
    """New tokens of each row up to its first end token (excluded, as the backends count them)."""
    ends = set(stop_ids)
    return sum(next((i for i, t in enumerate(row) if t in ends), len(row)) for row in rows)


def time_hf(w: Workload, *, samples, batch_size):
    from factory.sample import generate

    start = time.perf_counter()
    out = generate(
        w.model, w.tok, w.prompts, num_samples=samples, batch_size=batch_size, seeds=w.seeds, stop=w.stop,
        stop_token_ids=w.stop_ids, progress=False, **w.sampling,
    )  # fmt: skip
    _sync()
    return sum(s["num_tokens"] for per in out for s in per), time.perf_counter() - start


def time_plain_generate(w: Workload, *, samples, batch_size, static):
    """transformers ``generate`` with ``num_return_sequences`` (and optionally a static cache), on the same
    token ids (one BOS), stopping at the same end ids and stop strings."""
    from factory.tokens import encode_prompts

    pad = w.tok.pad_token_id if w.tok.pad_token_id is not None else w.stop_ids[0]
    ids = encode_prompts(w.tok, w.prompts)
    extra = {"cache_implementation": "static"} if static else {}
    if w.stop:
        extra.update(stop_strings=w.stop, tokenizer=w.tok)
    start, tokens = time.perf_counter(), 0
    for i in range(0, len(ids), batch_size):
        batch = ids[i : i + batch_size]
        width = max(map(len, batch))
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in batch], device=w.model.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in batch], device=w.model.device)
        with torch.inference_mode():
            out = w.model.generate(
                input_ids=input_ids, attention_mask=mask, do_sample=True, num_return_sequences=samples,
                pad_token_id=pad, eos_token_id=w.stop_ids, temperature=w.sampling["temperature"],
                top_k=w.sampling["top_k"], top_p=w.sampling["top_p"],
                max_new_tokens=w.sampling["max_new_tokens"], **extra,
            )  # fmt: skip
        tokens += _count(out[:, width:].tolist(), w.stop_ids)
    _sync()
    return tokens, time.perf_counter() - start


def _vllm_settings(dtype: str):
    from omegaconf import OmegaConf

    from factory.config import VllmSamplerConfig

    return OmegaConf.structured(VllmSamplerConfig(dtype=dtype))


class HfWorkers:
    """Our HF sampler spread over ``sampler.workers`` processes (``factory.sampling.workers``), as the E-step
    and eval run it with ``sampler.workers=N``; starting the processes and loading the model in each is
    timed apart, like a vLLM engine's start-up."""

    def __init__(self, w: Workload, *, samples: int, batch_size: int, workers: int):
        from factory.sampling.workers import GenerationWorkers

        self.w, self.samples, self.batch_size = w, samples, batch_size
        self.name = f"hf (factory.sampling.hf), {workers} processes, {batch_size} prompts per call"
        start = time.perf_counter()
        self.pool = GenerationWorkers(workers)
        self._call(self.w.prompts[:workers], self.w.seeds[:workers], 1, {**w.sampling, "max_new_tokens": 2})
        self.startup = time.perf_counter() - start

    def _call(self, prompts, seeds, batch_size, sampling):
        w = self.w
        return self.pool.generate(
            w.path, prompts, tokenizer=w.tok, dtype=w.dtype, batch_size=batch_size, num_samples=self.samples,
            seeds=seeds, stop=w.stop, stop_token_ids=w.stop_ids, progress=False, **sampling,
        )  # fmt: skip

    def run(self) -> tuple[int, float]:
        start = time.perf_counter()
        out = self._call(self.w.prompts, self.w.seeds, self.batch_size, self.w.sampling)
        return sum(s["num_tokens"] for per in out for s in per), time.perf_counter() - start

    def close(self) -> None:
        self.pool.close()


class OurVllm:
    """Our backend (``VllmSampler``: requests built here, sent to its process, completions decoded here)."""

    name = "vllm (VllmSampler)"

    def __init__(self, w: Workload, *, samples: int):
        from factory.sample import open_vllm

        self.w, self.samples = w, samples
        start = time.perf_counter()
        self.sampler = open_vllm(w.path, tokenizer=w.tok, settings=_vllm_settings(w.dtype))
        self.startup = time.perf_counter() - start

    def run(self) -> tuple[int, float]:
        w = self.w
        start = time.perf_counter()
        out = self.sampler.generate(w.prompts, num_samples=self.samples, seeds=w.seeds, stop=w.stop,
                                    stop_token_ids=w.stop_ids, **w.sampling)  # fmt: skip
        return sum(s["num_tokens"] for per in out for s in per), time.perf_counter() - start

    def close(self) -> None:
        self.sampler.close()


class PlainVllm:
    """Plain ``vllm.LLM.generate`` on the same requests (same engine arguments, token ids, per-prompt
    ``SamplingParams(n=K, seed=s)``, end ids and stops), in a process of its own like our backend's; only
    the ``generate`` call is timed, inside that process."""

    name = "plain vllm.LLM.generate"

    def __init__(self, w: Workload, *, samples: int):
        from factory.sample import vllm_engine_options
        from factory.tokens import encode_prompts

        options, dtype = vllm_engine_options(_vllm_settings(w.dtype))
        job = {
            "model": str(w.path), "dtype": dtype, "options": options, "seeds": w.seeds, "n": samples,
            "prompt_token_ids": encode_prompts(w.tok, w.prompts), "stop": w.stop, "stop_ids": w.stop_ids,
            **w.sampling,
        }  # fmt: skip
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_plain_vllm_child, args=(child, job), name="vllm-plain")
        self.proc.start()
        child.close()
        self.startup = self._receive()

    def run(self) -> tuple[int, float]:
        self.conn.send("generate")
        return self._receive()

    def _receive(self):
        result = self.conn.recv()
        if isinstance(result, str):
            raise RuntimeError(f"plain vLLM failed:\n{result}")
        return result

    def close(self) -> None:
        self.conn.send("close")
        self.proc.join(timeout=60)


def _plain_vllm_child(conn, job: dict) -> None:
    import traceback

    try:
        from vllm import SamplingParams

        from factory.sampling.vllm_backend import build_engine

        start = time.perf_counter()
        llm = build_engine(job["model"], dtype=job["dtype"], seed=0, options=job["options"])
        conn.send(time.perf_counter() - start)
        params = [
            SamplingParams(
                n=job["n"],
                temperature=job["temperature"],
                top_k=job["top_k"],
                top_p=job["top_p"],
                max_tokens=job["max_new_tokens"],
                seed=seed,
                stop=job["stop"] or None,
                stop_token_ids=job["stop_ids"],
            )  # fmt: skip
            for seed in job["seeds"]
        ]
        prompts = [{"prompt_token_ids": ids} for ids in job["prompt_token_ids"]]
        while conn.recv() == "generate":
            start = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - start
            rows = [list(o.token_ids) for out in outputs for o in out.outputs]
            conn.send((_count(rows, job["stop_ids"]), seconds))
    except BaseException:  # noqa: BLE001 - the parent reports it
        conn.send(traceback.format_exc())


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=None, help="prompts (demo/GPU 256, --model 32)")
    parser.add_argument(
        "--samples", type=int, default=None, help="samples per prompt (CPU 8, --model 4, GPU 1)"
    )
    parser.add_argument(
        "--batch-size", default=None, help="our HF prompts per call, comma list (CPU 16, GPU 256)"
    )
    parser.add_argument(
        "--generate-batch-sizes", default=None, help="transformers generate's prompts per call, comma list "
        "(default: --batch-size); the fastest is the reference",
    )  # fmt: skip
    parser.add_argument(
        "--backends", default=None, help="comma list of hf, vllm, generate, vllm-plain (default: all; "
        "vllm-plain only with --model)",
    )  # fmt: skip
    parser.add_argument("--model", default=None, help="a real model folder: GSM8K chat prompts")
    parser.add_argument("--gpu", action="store_true", help="Qwen2.5-0.5B-shaped random model on CUDA")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="--gpu: prompt length")
    parser.add_argument("--new-tokens", type=int, default=None, help="--gpu/--model: new tokens (256)")
    parser.add_argument(
        "--workers", type=int, default=0, help="also time our HF sampler over this many processes "
        "(sampler.workers), at each --batch-size that gives every process at least one batch",
    )  # fmt: skip
    parser.add_argument(
        "--rounds", type=int, default=1, help="rounds of every backend, alternating their order (a shared "
        "machine's load drifts); batch-size sweeps run in round 1, later rounds use the fastest size",
    )  # fmt: skip
    args = parser.parse_args()
    samples = args.samples or (1 if args.gpu else 4 if args.model else 8)
    batches = [int(b) for b in (args.batch_size or ("256" if args.gpu else "16")).split(",")]
    gen_batches = [int(b) for b in (args.generate_batch_sizes or str(batches[0])).split(",")]
    backends = args.backends or ("hf,generate,vllm,vllm-plain" if args.model else "hf,vllm,generate")
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("error: --gpu needs a CUDA device")
    w = (gpu_workload if args.gpu else real_workload if args.model else demo_workload)(args)
    device = torch.cuda.get_device_name() if args.gpu else _cpu_name()
    print(f"device: {device}; torch {torch.__version__}, {torch.get_num_threads()} threads; model {w.path}")
    print(f"{len(w.prompts)} prompts x {samples} samples, {w.sampling}, stop {w.stop}, end ids {w.stop_ids}")
    static = args.gpu  # the GPU reference: plain generate with a static cache
    runners, engines = {}, []
    for backend in backends.split(","):
        if backend == "hf":
            for size in batches:
                runners[f"hf (factory.sampling.hf), {size} prompts per call"] = functools.partial(
                    time_hf, w, samples=samples, batch_size=size
                )
                if args.workers > 1 and len(w.prompts) >= size * args.workers:  # a batch for each
                    pool = HfWorkers(w, samples=samples, batch_size=size, workers=args.workers)
                    engines.append(pool)
                    runners[pool.name] = pool.run
        elif backend == "generate":
            for size in gen_batches:
                name = f"transformers generate{' (static cache)' if static else ''}, {size} prompts per call"
                runners[name] = functools.partial(
                    time_plain_generate, w, samples=samples, batch_size=size, static=static
                )
        elif backend in ("vllm", "vllm-plain"):
            engine = (OurVllm if backend == "vllm" else PlainVllm)(w, samples=samples)  # start-up untimed
            engines.append(engine)
            runners[engine.name] = engine.run
        else:
            raise SystemExit(f"error: unknown backend {backend!r}; use hf, vllm, generate, vllm-plain")
    startups = {e.name: e.startup for e in engines}
    # One untimed short call per HF path first: the first forward allocates and picks kernels (vLLM warms
    # up while it starts).
    warm = dataclasses.replace(
        w, prompts=w.prompts[:1], seeds=w.seeds[:1], sampling={**w.sampling, "max_new_tokens": 2}
    )
    time_hf(warm, samples=samples, batch_size=1)
    time_plain_generate(warm, samples=samples, batch_size=1, static=static)
    rounds = []
    try:
        for r in range(args.rounds):
            names = list(runners) if r % 2 == 0 else list(runners)[::-1]  # alternate: load drift cancels
            if r > 0:  # later rounds: each HF path at its fastest batch size of round 1
                for prefix in ("hf", "transformers generate"):
                    sweep = [n for n in names if n.startswith(prefix)]
                    best = max(sweep, key=lambda n: rounds[0][n][0] / rounds[0][n][1], default=None)
                    names = [n for n in names if n not in sweep or n == best]
            results = {}
            for name in names:
                results[name] = runners[name]()
                tokens, seconds = results[name]
                print(f"  round {r + 1}: {name}: {tokens:,} tokens in {seconds:.1f} s "
                      f"({time.strftime('%H:%M:%S')})", flush=True)  # fmt: skip
            rounds.append(results)
    finally:
        for engine in engines:
            engine.close()
    for r, results in enumerate(rounds):
        print(f"\nround {r + 1} of {len(rounds)}")
        _report({n: results[n] for n in runners if n in results}, startups)


def _report(results: dict, startups: dict) -> None:
    rate = {name: tokens / seconds for name, (tokens, seconds) in results.items()}
    hf = max((r for n, r in rate.items() if n.startswith("hf")), default=None)  # the fastest batch size
    print("| backend | new tokens | seconds | tok/s | vs hf | start-up (s) |\n|---|---|---|---|---|---|")
    for name, (tokens, seconds) in results.items():
        ratio = f"{rate[name] / hf:.2f}x" if hf else "-"
        start = f"{startups[name]:.1f}" if name in startups else "-"
        print(f"| {name} | {tokens:,} | {seconds:.1f} | {rate[name]:,.1f} | {ratio} | {start} |")
    best_generate = max((r for n, r in rate.items() if n.startswith("transformers generate")), default=None)
    ours, plain = rate.get(OurVllm.name), rate.get(PlainVllm.name)
    if hf and best_generate:
        print(f"hf / best transformers generate: {hf / best_generate:.2f}x")
    if ours and plain:
        print(
            f"VllmSampler / plain vllm.LLM.generate: {ours / plain:.2f}x (engine start-up excluded from both)"
        )


def _cpu_name() -> str:
    """The CPU's model name (lscpu's), else the platform's machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
