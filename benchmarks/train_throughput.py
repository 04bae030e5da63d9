"""M-step throughput: tokens/s and model FLOPs utilisation through the project's own Lightning M-step.

Run (CPU, the demo's tiny model):   ``.venv/bin/python benchmarks/train_throughput.py``
Run (one GPU, Qwen2.5-0.5B shape):  ``.venv/bin/python benchmarks/train_throughput.py --model qwen0.5b``
(the GPU preset: bf16-mixed, torch.compile, chunked loss, batch 16 x 1024; see ``--help`` for overrides).

Every step goes through ``train.finetune.fine_tune`` (data module, ``CausalLMModule``, Lightning Trainer)
on synthetic prompt/completion pairs of exactly ``--seq-len`` tokens (a quarter prompt), with random
weights. A callback times the optimizer steps after ``--warmup`` (compilation, allocator warm-up).

MFU = achieved model FLOP/s / peak FLOP/s. Model FLOPs per token follow nanoGPT / PaLM:
``6 N + 12 L d T`` (N: parameters in matmuls, the output head included and the embedding lookup not;
L layers, d = heads x head_dim, T tokens per sample; the attention term counts the full T x T scores,
as that convention does). The peak is measured in the same run: the best of a few square matmuls in the
training dtype (bf16 for bf16 precisions, fp32 otherwise) on the same device.
"""

from __future__ import annotations

import argparse
import platform
import random
import string
import tempfile
import time

import torch

PRESETS = {
    # The demo's tiny model (conf/model/tiny_arith.yaml) and trainer (conf/trainer/cpu.yaml).
    "tiny": {"trainer": "cpu", "batch_size": 4, "seq_len": 128, "steps": 60, "warmup": 10},
    # Qwen2.5-0.5B's shape (config.json of Qwen/Qwen2.5-0.5B), random weights, on one GPU.
    "qwen0.5b": {"trainer": "gpu", "batch_size": 16, "seq_len": 1024, "steps": 30, "warmup": 10},
}
QWEN_0_5B = {
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
}


def build_model(name: str, tokenizer):
    """The benchmark's model with random weights (tiny: the demo's shape; qwen0.5b: Qwen2.5-0.5B's)."""
    from factory.models import build_tiny_model

    if name == "tiny":
        return build_tiny_model(
            tokenizer, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512,
            max_position_embeddings=2048,
        )  # fmt: skip
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        **QWEN_0_5B,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config)


def synthetic_pairs(n: int, seq_len: int, *, seed: int = 0) -> list[dict]:
    """``n`` random prompt/completion pairs of exactly ``seq_len`` tokens with the char tokenizer.

    One token per character, plus ``<s>`` before the prompt and ``</s>`` after the completion.
    """
    rng = random.Random(seed)
    prompt_len = seq_len // 4 - 1
    completion_len = seq_len - prompt_len - 2
    chars = string.ascii_letters + string.digits + " +-=."
    return [
        {
            "prompt": "".join(rng.choices(chars, k=prompt_len)),
            "completion": "".join(rng.choices(chars, k=completion_len)),
        }
        for _ in range(n)
    ]


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token: 6 N (matmul parameters) + 12 L d T (attention scores and values)."""
    config = model.config
    embedding = model.get_input_embeddings().weight.numel()
    matmul_params = sum(p.numel() for p in model.parameters()) - embedding
    if config.tie_word_embeddings:
        matmul_params += embedding  # the tied head is one matrix but still one matmul per token
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * head_dim * seq_len
    return 6 * matmul_params + attention


def peak_matmul_flops(device: str, dtype: torch.dtype, *, size: int, repeats: int = 10) -> float:
    """Best FLOP/s of ``size``-square matmuls in ``dtype`` on ``device`` (the MFU denominator)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    best = float("inf")
    for _ in range(3):
        a @ b  # warm-up
    for _ in range(3):
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - start) / repeats)
    return 2 * size**3 / best


def step_timer(warmup: int, device: str):
    """A Lightning callback recording the wall time of every optimizer step after ``warmup``."""
    from lightning.pytorch.callbacks import Callback

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    class StepTimer(Callback):
        def __init__(self):
            self.start = None
            self.steps = 0
            self.seconds = 0.0

        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == warmup and self.start is None:
                sync()
                self.start = time.perf_counter()

        def on_train_end(self, trainer, *args):
            sync()
            self.steps = trainer.global_step - warmup
            self.seconds = time.perf_counter() - self.start

    return StepTimer()


def main() -> None:
    parser = argparse.ArgumentParser(
        description="M-step tokens/s and MFU through the project's Lightning M-step.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--batch-size", type=int, help="samples per optimizer step (preset)")
    parser.add_argument("--micro-batch", type=int, help="samples per forward pass (default: --batch-size)")
    parser.add_argument("--seq-len", type=int, help="tokens per sample (preset)")
    parser.add_argument("--steps", type=int, help="timed optimizer steps (preset)")
    parser.add_argument("--warmup", type=int, help="untimed first steps (preset)")
    parser.add_argument("--trainer", help="trainer config to start from: cpu | gpu (preset)")
    parser.add_argument("--peak-size", type=int, help="matmul size for the peak (8192 GPU, 2048 CPU)")
    parser.add_argument(
        "overrides", nargs="*", help="trainer.* overrides, e.g. trainer.packing=true trainer.compile=false"
    )
    args = parser.parse_args()
    preset = PRESETS[args.model]
    batch = args.batch_size or preset["batch_size"]
    seq_len = args.seq_len or preset["seq_len"]
    steps = args.steps or preset["steps"]
    warmup = args.warmup if args.warmup is not None else preset["warmup"]

    from factory.config import compose
    from factory.models import train_char_tokenizer
    from train.finetune import fine_tune

    cfg = compose(
        [
            "paths.run_dir=unused",
            f"trainer={args.trainer or preset['trainer']}",
            f"trainer.max_steps={warmup + steps}",
            f"trainer.batch_size={args.micro_batch or batch}",
            f"trainer.global_batch_size={batch}",
            "trainer.warmup_steps=1",
            "trainer.lr=1e-4",
            "trainer.checkpoint_every_n_steps=0",
            "trainer.progress_bar=false",
            *args.overrides,
        ]
    )
    settings = cfg.trainer
    device = "cuda" if settings.accelerator in ("gpu", "cuda") else "cpu"
    pairs = synthetic_pairs(max(4 * batch, 64), seq_len)
    tokenizer = train_char_tokenizer([p["prompt"] + p["completion"] for p in pairs[:8]])
    model = build_model(args.model, tokenizer)
    params = sum(p.numel() for p in model.parameters())
    timer = step_timer(warmup, device)
    with tempfile.TemporaryDirectory() as tmp:
        fine_tune(
            model=model, tokenizer=tokenizer, pairs=pairs, out_dir=f"{tmp}/model", settings=settings,
            callbacks=[timer],
        )  # fmt: skip
    tokens_per_s = timer.steps * batch * seq_len / timer.seconds
    achieved = tokens_per_s * flops_per_token(model, seq_len)
    dtype = torch.bfloat16 if str(settings.precision).startswith("bf16") else torch.float32
    peak = peak_matmul_flops(device, dtype, size=args.peak_size or (8192 if device == "cuda" else 2048))

    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    print(f"\ndevice: {name}; torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(
        f"model: {args.model} ({params / 1e6:.1f}M parameters), trainer={args.trainer or preset['trainer']} "
        f"precision={settings.precision} packing={settings.packing} compile={settings.compile} "
        f"loss_chunk_size={settings.loss_chunk_size} gradient_checkpointing={settings.gradient_checkpointing}"
    )
    print(
        f"batch {batch} x {seq_len} tokens (micro-batch {settings.batch_size}), "
        f"{timer.steps} timed steps after {warmup}"
    )
    print("\n| tokens/s | step (s) | model TFLOP/s | peak matmul TFLOP/s | MFU |")
    print("|---|---|---|---|---|")
    print(
        f"| {tokens_per_s:,.0f} | {timer.seconds / timer.steps:.3f} | {achieved / 1e12:.3f} | "
        f"{peak / 1e12:.3f} ({str(dtype).removeprefix('torch.')}) | {achieved / peak:.1%} |"
    )


if __name__ == "__main__":
    main()
