"""No stale results: a finished stage is reused only under the inputs it was made from.

One shrunken run (iteration 1 and the SFT baseline) is finished once for the module (slow: it pretrains a
base model that solves some problems); each slow test reruns a copy of it with one group of settings
changed, and the rerun either stops, naming the stage folder and the changed keys, without writing
anything, or (throughput-only settings) reuses everything. The E-step tests use an untrained model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import sys

import polars as pl
import pytest
from conftest import DATA_DIR, EASY_ARITH, SHRINK, needs_data
from omegaconf import OmegaConf

import factory.loop as loop
from eval import evaluate
from factory import sample, snapshot, verify
from factory.config import compose
from factory.rundir import RunDir, read_shards
from factory.tasks import arith
from train import m_step

OVERRIDES = [
    *SHRINK,
    *EASY_ARITH,
    "name=stale",
    "loop.iterations=1",
    "task.num_test=8",
    "eval.num_samples=2",
    "eval.ks=[1,2]",
]
STAGE_FUNCTIONS = ("e_step", "verify_samples", "snapshot_stage", "train_from_base", "evaluate_model")


def _boom(*args, **kwargs):
    raise AssertionError("a finished stage was computed again")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run (base eval, iteration 1, SFT baseline) and its cache (base model, E-step cache)."""
    root = tmp_path_factory.mktemp("stale")
    cfg = compose([f"paths.run_dir={root / 'run'}", f"paths.cache_dir={root / 'cache'}", *OVERRIDES])
    rows = loop.run(cfg)
    assert [r["iteration"] for r in rows] == [0, 1, "sft_human"] and rows[1]["num_kept"] > 0
    return root, rows


@pytest.fixture
def rerun(finished, tmp_path):
    """``(make_cfg, run_dir, rows)``: configs over a private copy of the finished run, with changes."""
    root, rows = finished
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)

    def make_cfg(*changes: str):
        return compose([f"paths.run_dir={run}", f"paths.cache_dir={root / 'cache'}", *OVERRIDES, *changes])

    return make_cfg, RunDir(run), rows


def _refused(cfg, run_dir: RunDir, monkeypatch, *patterns: str) -> str:
    """Reruns the loop with every stage booby-trapped; it must stop with an error matching ``patterns``
    and leave config.yaml and the run dir's files as they were."""
    for name in STAGE_FUNCTIONS:
        monkeypatch.setattr(loop, name, _boom)
    before = _files(run_dir)
    with pytest.raises(FileExistsError) as err:
        loop.run(cfg)
    message = str(err.value)
    for pattern in patterns:
        assert pattern in message, message
    assert "name=" in message and "paths.run_dir=" in message, message
    assert _files(run_dir) == before, "a refused run must not write anything"
    return message


def _files(run_dir: RunDir) -> dict[str, bytes]:
    return {
        str(p.relative_to(run_dir.root)): p.read_bytes()
        for p in sorted(run_dir.root.rglob("*"))
        if p.is_file() and p.name != ".restem-fingerprint.json"
    }


@pytest.mark.slow
def test_throughput_settings_reuse_every_stage(rerun, monkeypatch):
    make_cfg, run_dir, rows = rerun
    for name in STAGE_FUNCTIONS:
        monkeypatch.setattr(loop, name, _boom)
    cfg = make_cfg(
        "sampler.batch_size=3",
        "sampler.shard_size=7",
        "eval.batch_size=5",
        "trainer.progress_bar=true",
        "trainer.checkpoint_every_n_steps=3",
    )
    assert loop.run(cfg) == rows
    assert "batch_size: 5" in (run_dir.root / "config.yaml").read_text()  # the accepted run's config


@pytest.mark.slow
@pytest.mark.parametrize(
    "change, named",
    [
        ("eval.split=validation", "eval.split: 'test' -> 'validation'"),
        ("eval.num_samples=4", "eval.num_samples: 2 -> 4"),
    ],
)
def test_changed_eval_setting_is_refused(rerun, monkeypatch, change, named):
    make_cfg, run_dir, _ = rerun
    message = _refused(make_cfg(change), run_dir, monkeypatch, str(run_dir.stage(0, "eval")), named)
    assert "was made from other inputs" in message
    # The stage command checks the same way.
    with pytest.raises(FileExistsError, match=re.escape(named)):
        evaluate.run(make_cfg(change, "iteration=1"))


@pytest.mark.slow
def test_changed_trainer_setting_is_refused(rerun, monkeypatch):
    make_cfg, run_dir, _ = rerun
    # The base model and its evaluation, and iteration 1's samples and snapshot do not depend on it.
    _refused(
        make_cfg("trainer.lr=0.002"),
        run_dir,
        monkeypatch,
        str(run_dir.stage(1, "model")),
        "trainer.lr: 0.001 -> 0.002",
    )
    with pytest.raises(FileExistsError, match=r"trainer\.lr"):
        m_step.run(make_cfg("trainer.lr=0.002", "iteration=1"))


@pytest.mark.slow
def test_changed_loop_setting_is_refused(rerun, monkeypatch):
    make_cfg, run_dir, _ = rerun
    _refused(
        make_cfg("loop.include_human_data=true"),
        run_dir,
        monkeypatch,
        str(run_dir.stage(1, "model")),
        "loop.include_human_data: False -> True",
        "training data",
    )


@pytest.mark.slow
def test_changed_verifier_setting_is_refused(rerun, monkeypatch):
    make_cfg, run_dir, _ = rerun
    # Evaluation always judges final answers, and the samples do not depend on the verifier.
    _refused(
        make_cfg("task.strictness=steps"),
        run_dir,
        monkeypatch,
        str(run_dir.stage(1, "verdicts")),
        "task.strictness: 'answer' -> 'steps'",
    )
    with pytest.raises(FileExistsError, match=r"iter_1/verdicts .*task\.strictness"):
        verify.run(make_cfg("task.strictness=steps", "iteration=1"))
    with pytest.raises(FileExistsError, match=r"iter_1/dataset .*verifier\.strictness"):
        snapshot.run(make_cfg("task.strictness=steps", "iteration=1"))


@pytest.mark.slow
def test_refusal_is_one_error_line_of_the_command(rerun, capsys):
    make_cfg, run_dir, _ = rerun
    argv = [f"paths.run_dir={run_dir.root}", f"paths.cache_dir={make_cfg().paths.cache_dir}", *OVERRIDES]
    old, root = sys.argv, logging.getLogger()
    handlers, level = list(root.handlers), root.level
    sys.argv = ["restem", *argv, "eval.split=validation"]
    try:
        with pytest.raises(SystemExit) as exit_info:
            loop.main()
    finally:  # Hydra points the root logger at this test's captured stderr: undo it for the next tests
        sys.argv = old
        root.handlers[:] = handlers
        root.setLevel(level)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1, err
    assert err.rstrip("\n").rsplit("\n", 1)[-1].startswith(f"error: {run_dir.stage(0, 'eval')} was made from")


@pytest.mark.slow
def test_changed_prompts_are_refused(rerun, monkeypatch):
    make_cfg, run_dir, _ = rerun
    monkeypatch.setattr(arith, "format_prompt", lambda problem: f"Question: {problem['question']}\nA: ")
    _refused(make_cfg(), run_dir, monkeypatch, str(run_dir.stage(0, "eval")), "changed: ", "rendered prompts")
    with pytest.raises(FileExistsError, match="rendered prompts"):
        sample.run(make_cfg("iteration=1"))


@pytest.mark.slow
def test_stage_finished_by_older_code_is_refused(rerun, monkeypatch):
    make_cfg, run_dir, _ = rerun
    path = run_dir.stage(1, "verdicts") / "stage.json"
    info = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in info.items() if not k.startswith("inputs")}))
    _refused(make_cfg(), run_dir, monkeypatch, str(run_dir.stage(1, "verdicts")), "older version of restem")


def _small_point(make_cfg, tmp_path, name: str, *changes: str):
    """A stage-command config over run dir ``name`` (cache shared by the test's points) with a base model
    pretrained for two steps and six problems: the E-step is seconds."""
    cfg = make_cfg(
        "model.pretrain.max_steps=2",
        "task.num_train=6",
        "sampler.num_samples=2",
        "sampler.max_new_tokens=8",
        "iteration=1",
        *changes,
    )
    OmegaConf.update(cfg, "paths.run_dir", str(tmp_path / name))
    return cfg


def test_e_step_cache_misses_when_the_prompts_change(make_cfg, tmp_path, monkeypatch):
    def point(name: str):
        return _small_point(make_cfg, tmp_path, name)

    assert sample.run(point("first"))["generated"] == 12
    assert sample.run(point("same"))["generated"] == 0  # served from the cache
    monkeypatch.setattr(arith, "format_prompt", lambda problem: f"Question: {problem['question']}\nA: ")
    assert sample.run(point("new_prompts"))["generated"] == 12, "samples of other prompts were reused"
    prompts = read_shards(RunDir(tmp_path / "new_prompts").stage(1, "samples"))["prompt"]
    assert all(p.startswith("Question: ") for p in prompts)


def test_partial_shards_of_other_settings_are_not_resumed(make_cfg, tmp_path, monkeypatch):
    """An E-step stopped mid-way and rerun with another temperature starts over: its shards never mix."""

    def fake_generate(model, tokenizer, prompts, *, num_samples, temperature, seeds, **kwargs):
        if temperature == 0.8 and fake_generate.calls == 1:
            raise KeyboardInterrupt("stopped after the first shard")
        fake_generate.calls += 1
        row = {"completion": f"t={temperature}", "num_tokens": 1, "finish_reason": "stop"}
        return [[{**row, "seed": s + j} for j in range(num_samples)] for s in seeds]

    fake_generate.calls = 0
    monkeypatch.setattr(sample, "generate", fake_generate)
    small = ("sampler.shard_size=2", "sampler.cache=false")
    with contextlib.suppress(KeyboardInterrupt):
        sample.run(_small_point(make_cfg, tmp_path, "run", *small))
    assert len(list((tmp_path / "run" / "iter_1" / ".samples.partial").glob("shard-*"))) == 1
    sample.run(_small_point(make_cfg, tmp_path, "run", *small, "sampler.temperature=0.5"))
    completions = read_shards(RunDir(tmp_path / "run").stage(1, "samples"))["completion"]
    assert completions.unique().to_list() == ["t=0.5"]


def test_changed_prompt_style_is_refused_by_the_loop_and_the_e_step(make_cfg, monkeypatch):
    """A real prompt setting (GSM8K's prompt style and shots): the error names the rendered prompts and
    the setting behind them. (The tiny base model is pretrained on prompts of the style, so its weights
    change too; test_changed_prompts_are_refused keeps the base and changes only the prompts.)"""
    needs_data("gsm8k/train.jsonl", "gsm8k/test.jsonl")
    overrides = [
        "task=gsm8k",
        f"paths.data_dir={DATA_DIR}",
        "model.pretrain.max_steps=2",
        "task.num_human=8",
        "task.num_train=4",
        "task.num_validation=4",
        "task.num_test=4",
        "task.max_chars=200",
        "sampler.num_samples=2",
        "sampler.max_new_tokens=8",
        "eval.num_samples=2",
        "eval.ks=[1,2]",
        "eval.max_new_tokens=8",
        "loop.iterations=1",
        "loop.sft_baseline=false",
        "loop.stop_on_empty_snapshot=true",
    ]
    first = make_cfg(*overrides, "task.prompt_style=fewshot", "task.num_shots=2")
    loop.run(first)  # an untrained model: the snapshot is empty and the loop stops after iteration 1
    run_dir = RunDir(first.paths.run_dir)
    assert run_dir.is_done(0, "eval") and run_dir.is_done(1, "samples")
    for change, named in (
        ("task.num_shots=3", "task.num_shots: 2 -> 3"),
        ("task.prompt_style=plain", "task.prompt_style: 'fewshot' -> 'plain'"),
    ):
        changed = make_cfg(*overrides, "task.prompt_style=fewshot", "task.num_shots=2", change)
        with monkeypatch.context() as patch:
            _refused(changed, run_dir, patch, str(run_dir.stage(0, "eval")), "rendered prompts", named)
        with pytest.raises(FileExistsError, match=r"iter_1/samples.*rendered prompts"):
            sample.run(
                make_cfg(*overrides, "task.prompt_style=fewshot", "task.num_shots=2", change, "iteration=1")
            )
    assert pl.read_parquet(run_dir.stage(0, "eval") / "per_problem.parquet").height == 4


def test_partial_folder_keeps_only_work_of_its_inputs(tmp_path):
    from factory.rundir import claim_partial, finish_partial

    out = tmp_path / "iter_1" / "verdicts"
    work = claim_partial(out, {"config": {"task": {"strictness": "answer"}}})
    (work / "shard-00000.parquet").write_bytes(b"made with answer")
    assert claim_partial(out, {"config": {"task": {"strictness": "answer"}}}) == work
    assert (work / "shard-00000.parquet").is_file()  # same inputs: resumed
    steps = {"config": {"task": {"strictness": "steps"}}}
    claim_partial(out, steps)
    assert not (work / "shard-00000.parquet").exists()  # other inputs: started over
    finish_partial(work, out, seconds=0.0)
    info = json.loads((out / "stage.json").read_text())
    assert info["inputs"] == steps and sorted(p.name for p in out.iterdir()) == ["stage.json"]
