"""Sampling backends: ``hf`` (transformers models, our own decode loop) and ``vllm`` (a vLLM engine in a
child process). Both draw sample j of a prompt with seed ``problem_seed + j``.

Modules depend one way: ``cores``, ``seeds``, ``gumbel``, ``kv_cache`` and ``completions`` need nothing else here;
``hf`` builds on them, ``vllm_backend`` on ``completions``; ``factory.sample`` (the E-step) imports from
this package and never the reverse.
"""
