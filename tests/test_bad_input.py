"""Bad input gets one clear line naming the problem (``error: ...`` from the commands), and finished work
stays on disk. One test per case of the crash-safety issue; each runs the real command in-process."""

from __future__ import annotations

import logging
import sys

import polars as pl
import pytest
from conftest import DATA_DIR, needs_data
from datasets import load_from_disk

from factory import loop, snapshot, verify
from factory.config import compose
from factory.rundir import RunDir, mark_done, write_json
from factory.tasks import build_task
from factory.verify import MAX_COMPLETION_CHARS, judge, verify_samples
from train import m_step


def _command(main, argv: list[str], capsys, *, one_line: bool = True) -> str:
    """Runs a console-script ``main`` with ``argv``; returns the one error line it ends with (exit 1).

    Progress bars may come before it on stderr; a traceback may not.
    """
    old, root = sys.argv, logging.getLogger()
    handlers, level = list(root.handlers), root.level
    sys.argv = ["restem", *argv]
    try:
        with pytest.raises(SystemExit) as exit_info:
            main()
    finally:
        # Hydra points the root logger at this test's captured stderr: undo it for the next tests.
        sys.argv = old
        root.handlers[:] = handlers
        root.setLevel(level)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    if not one_line:  # Hydra's own composition errors (several lines, no traceback)
        return err
    last = err.rstrip("\n").rsplit("\n", 1)[-1]
    assert err.count("error:") == 1 and last.startswith("error:"), err
    return last


def _paths(tmp_path) -> list[str]:
    return [f"paths.run_dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}"]


def _finished_samples(run_dir: RunDir, k: int, frames: list[pl.DataFrame]) -> None:
    """A finished E-step folder holding ``frames`` as its shards."""
    out = run_dir.stage(k, "samples")
    out.mkdir(parents=True)
    for i, frame in enumerate(frames):
        frame.write_parquet(out / f"shard-{i:05d}.parquet")
    mark_done(out, seconds=0.0)


def _samples(problems: list[dict], completions: list[str]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "problem_id": [p["problem_id"] for p in problems],
            "sample_idx": [0] * len(problems),
            "prompt": [f"Q: {p['question']}" for p in problems],
            "completion": completions,
        },
        schema={
            "problem_id": pl.String,
            "sample_idx": pl.Int32,
            "prompt": pl.String,
            "completion": pl.String,
        },
    )


def test_misspelt_config_key(tmp_path, capsys):
    err = _command(loop.main, ["sampler.temprature=0.7", *_paths(tmp_path)], capsys, one_line=False)
    assert "Key 'temprature' not in 'SamplerConfig'" in err
    assert not (tmp_path / "run").exists(), "a config error must not write anything"


def test_missing_data_file(tmp_path, capsys):
    err = _command(
        loop.main, ["task=gsm8k", f"paths.data_dir={tmp_path / 'nowhere'}", *_paths(tmp_path)], capsys
    )
    assert err.startswith("error: data file ") and "gsm8k/train.jsonl not found: set paths.data_dir" in err


def test_corrupt_parquet_shard_is_named_and_finished_shards_are_kept(tmp_path, capsys):
    run_dir = RunDir(tmp_path / "run")
    problems = build_task(compose(["name=t"]).task).load_problems(split="train")
    _finished_samples(run_dir, 1, [_samples(problems[:3], ["Answer: 1"] * 3)])
    (run_dir.stage(1, "samples") / "shard-00001.parquet").write_bytes(
        b"PAR1 half a shard, the disk filled up"
    )
    err = _command(verify.main, ["iteration=1", "name=t", *_paths(tmp_path)], capsys)
    assert err.startswith("error: corrupt parquet shard ") and "shard-00001.parquet" in err
    assert "Delete it and rerun to regenerate it." in err
    # The good shard's verdicts were written before the bad one was reached, and stay for the rerun.
    assert (run_dir.iteration(1) / ".verdicts.partial" / "shard-00000.parquet").is_file()
    assert not run_dir.is_done(1, "verdicts")


def test_model_path_that_does_not_exist(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    overrides = ["model=hf", f"model.name_or_path={missing}", "task.num_test=5", *_paths(tmp_path)]
    err = _command(loop.main, overrides, capsys)
    assert err == f"error: model folder not found: {missing} (check model.name_or_path)"


def test_smollm2_not_fetched_yet_names_the_fetch_command(tmp_path, capsys):
    overrides = ["model=smollm2_135m_instruct", "task.num_test=5", *_paths(tmp_path)]
    err = _command(loop.main, overrides, capsys)
    missing = tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct"
    assert err == (
        f"error: model folder not found: {missing} (check model.name_or_path; "
        "fetch it with: restem-fetch-model smollm2 (or: make smollm2))"
    )


def test_a_pretrained_model_with_the_tiny_demos_recipe_is_refused(tmp_path, capsys):
    overrides = ["model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct", *_paths(tmp_path)]
    err = _command(loop.main, overrides, capsys, one_line=False).rstrip("\n")
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith(
        "error: config error: model.name_or_path='Qwen/Qwen2.5-0.5B-Instruct' with model=tiny_arith"
    )
    assert err.endswith("or model=hf model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct")


def test_zero_problems_after_filtering(tmp_path, capsys):
    needs_data("gsm8k/train.jsonl", "gsm8k/test.jsonl")
    overrides = ["task=gsm8k", "task.max_chars=20", f"paths.data_dir={DATA_DIR}", *_paths(tmp_path)]
    err = _command(loop.main, overrides, capsys)
    assert err.startswith("error: task 'gsm8k': ") and "max_chars=20" in err


def test_snapshot_with_zero_kept_samples(tmp_path, capsys):
    """Snapshotting all-wrong verdicts gives an empty (valid) dataset; training on it is refused."""
    run_dir = RunDir(tmp_path / "run")
    problems = build_task(compose(["name=t"]).task).load_problems(split="train")
    _finished_samples(run_dir, 1, [_samples(problems[:4], ["no answer here"] * 4)])
    args = ["iteration=1", "name=t", "model.pretrain.max_steps=2", *_paths(tmp_path)]
    verify.run(compose(args))
    manifest = snapshot.run(compose(args))
    assert manifest["num_kept"] == 0 and manifest["status_counts"] == {"unparseable": 4}
    assert len(load_from_disk(str(run_dir.stage(1, "dataset")))["train"]) == 0
    err = _command(m_step.main, args, capsys)
    assert err.startswith(
        f"error: the snapshot {run_dir.stage(1, 'dataset')} kept 0 samples: nothing to train on"
    )
    assert run_dir.is_done(1, "dataset") and not run_dir.stage(1, "model").exists()


def test_non_utf8_and_megabyte_completions_get_a_status(tmp_path):
    cfg = compose(["name=t", "task.strictness=answer"])
    task = build_task(cfg.task)
    problems = task.load_problems(split="train")[:4]
    gold = problems[0]["answer"]
    completions = [
        f"broken bytes \udcff\udc80 Answer: {gold}",  # a lenient (surrogateescape) decode of bad UTF-8
        b"\xff\xfe Answer: 1".decode("utf-8", "replace"),  # replacement characters: valid UTF-8
        "1+1=2. " * (MAX_COMPLETION_CHARS // 7 + 10) + f"Answer: {problems[2]['answer']}",  # ~100 KB
        "x" * 1_000_000 + f" Answer: {problems[3]['answer']}",  # a megabyte
    ]
    verdicts = judge(task, problems, completions)
    assert verdicts[0]["status"] == "correct" and verdicts[1]["status"] in ("wrong", "correct")
    assert [v["status"] for v in verdicts[2:]] == ["too_long", "too_long"]
    assert "1,000,0" in verdicts[3]["detail"] and "not judged" in verdicts[3]["detail"]
    # The verify stage writes all of them (surrogates replaced) and the run goes on.
    samples_dir = tmp_path / "samples"
    samples_dir.mkdir()
    _samples(problems, [c.encode("utf-8", "replace").decode() for c in completions]).write_parquet(
        samples_dir / "shard-00000.parquet"
    )
    result = verify_samples(
        task=task, problems=problems, samples_dir=samples_dir, out_dir=tmp_path / "verdicts"
    )
    assert result["num_verdicts"] == 4 and result["status_counts"]["too_long"] == 2


def test_run_dir_of_an_incompatible_version(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    write_json(run / "run_format.json", {"version": 999})
    (run / "iter_1").mkdir()
    err = _command(loop.main, _paths(tmp_path), capsys)
    assert err.startswith(f"error: run directory {run} was written by run format 999; this version reads")
    assert "Use a new paths.run_dir (nothing was changed)." in err
    assert not (run / "config.yaml").exists() and (run / "iter_1").is_dir()


def test_eval_judges_megabyte_completions_like_the_verify_stage(tmp_path, tiny_model_dir, monkeypatch):
    """Evaluation goes through the verify stage's guarded judge: a runaway completion is not parsed (it
    would otherwise count as correct here: it ends with the right answer)."""
    import factory.sample as sample_module
    from eval.evaluate import evaluate_model

    cfg = compose(["name=t", "task.strictness=answer", "eval.num_samples=2", "eval.ks=[1,2]"])
    task = build_task(cfg.task)
    problems = task.load_problems(split="test")[:2]

    def garbage(model, tokenizer, prompts, *, num_samples, **kwargs):
        texts = ["x" * 1_000_000 + f" Answer: {problems[0]['answer']}", "\ufffd\ufffd Answer: -1"]
        return [
            [{"completion": texts[i % 2], "num_tokens": 1, "finish_reason": "length", "seed": 0}]
            * num_samples
            for i in range(len(prompts))
        ]

    monkeypatch.setattr(sample_module, "generate", garbage)
    metrics = evaluate_model(
        model_path=tiny_model_dir, task=task, problems=problems, settings=cfg.eval, out_dir=tmp_path / "eval"
    )
    assert metrics["num_problems"] == 2 and metrics["greedy_accuracy"] == 0.0
    statuses = pl.read_parquet(tmp_path / "eval" / "per_problem.parquet")["greedy_status"].to_list()
    assert statuses == ["too_long", "wrong"]
