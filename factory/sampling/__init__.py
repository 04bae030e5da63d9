"""Sampling backends: ``hf`` (transformers models, our own decode loop) and ``vllm`` (a vLLM engine in a
child process). Both draw sample j of a prompt with seed ``problem_seed + j``."""
