"""Every config composes; typos and bad values fail at compose time naming the key; real models get
real-model defaults, and the tiny recipes compose exactly as before."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError

from factory.config import CONF_DIR, compose

REPO = Path(__file__).resolve().parents[1]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["task", "model", "sampler", "trainer", "paths", "experiment"])
def test_every_option_of_every_group_composes(group):
    options = _options(group)
    assert options, f"conf/{group} has no yaml files"
    for option in options:
        if "reasoning_gym" in option and importlib.util.find_spec("reasoning_gym") is None:
            continue  # its validation asks for the extra (tests/test_reasoning_gym.py); make test installs it
        # model=hf is a generic recipe: it needs the model's name (validation says so, tested below).
        extra = ["model.name_or_path=some-org/some-model"] if (group, option) == ("model", "hf") else []
        cfg = compose([f"{group}={option}", *extra])
        assert cfg.paths.run_dir


def test_default_is_the_tiny_arith_model_and_the_demo_is_an_experiment():
    cfg = compose()
    assert (cfg.name, cfg.task.name, cfg.model.name) == ("restem", "arith", "tiny_arith")
    assert cfg.paths.run_dir == "runs/restem"
    assert cfg.snapshot.max_per_problem == 10
    assert cfg.loop.iterations == 3
    demo = compose(["experiment=arith_demo"])
    assert demo.paths.run_dir == "runs/arith_demo" and demo.loop.iterations == 2
    assert demo.trainer.select.every > 0 and demo.model.pretrain.select.every > 0


def test_the_demo_recipe_stays_out_of_other_runs():
    """conf/experiment/arith_demo.yaml's K, temperature, workers and selection apply to the demo only:
    a real model on a real task composes its own recipe's values (the experiment is not a default)."""
    cfg = compose(["model=smollm2_135m_instruct", "task=gsm8k"])
    assert cfg.sampler.workers == 1 and cfg.trainer.select.every == 0 and cfg.trainer.epochs is None
    assert (cfg.sampler.num_samples, cfg.sampler.temperature) != (4, 1.0)
    # The demo with the vLLM sampler or a multi-GPU trainer composes (workers is the HF backend's key;
    # selection refuses a launched fit when it starts, tests/test_selection.py).
    compose(["experiment=arith_demo", "sampler=vllm"])
    compose(["experiment=arith_demo", "trainer=ddp"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("sampler.temprature=0.7", "temprature"),
        ("task.num_trian=5", "num_trian"),
        ("loop.iteratons=2", "iteratons"),
        ("trainer.lr_rate=1", "lr_rate"),
    ],
)
def test_misspelt_key_fails_naming_it(override, key):
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as err:
        compose([override])
    assert key in str(err.value) + str(err.value.__cause__)


def test_wrong_type_fails():
    with pytest.raises(ConfigCompositionException) as err:
        compose(["sampler.num_samples=many"])
    assert "num_samples" in str(err.value) + str(err.value.__cause__)


@pytest.mark.parametrize(
    "override, message",
    [
        ("task.strictness=lenient", "task.strictness"),
        ("sampler.num_samples=0", "sampler.num_samples"),
        ("sampler.top_p=1.5", "sampler.top_p"),
        ("model.tiny.num_heads=8", "model.tiny.hidden_size / model.tiny.num_heads"),
        ("eval.split=train", "eval.split"),
        ("trainer.loss_chunk_size=-1", "trainer.loss_chunk_size"),
    ],
)
def test_bad_values_fail_with_the_key(override, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        compose([override])


# ---- real models: recipes, generation lengths, the paper's E-step --------------------------------------

REAL_TASKS = ["gsm8k", "math", "math500", "mbpp", "humaneval", "apps"]
# Fewest new tokens a chain of thought / program of each task may get, in the E-step and in eval.
MIN_NEW_TOKENS = {"gsm8k": 512, "math": 1024, "math500": 1024, "mbpp": 768, "humaneval": 768, "apps": 768}
RECIPES = [m for m in _options("model") if m not in ("tiny_arith", "hf")]
# Each model: the recipe's own overrides (model=hf needs a name).
MODELS = [(m, []) for m in RECIPES] + [("hf", ["model.name_or_path=some-org/some-model"])]


def test_every_model_named_in_the_brief_has_a_recipe():
    assert set(RECIPES) >= {
        "smollm2_135m_instruct",
        "qwen2_5_0_5b_instruct",
        "qwen2_5_1_5b_instruct",
        "qwen2_5_math_1_5b",
        "llama3_2_1b_instruct",
    }


@pytest.mark.parametrize("model, extra", MODELS, ids=[m for m, _ in MODELS])
@pytest.mark.parametrize("task", REAL_TASKS)
def test_real_model_on_a_real_task_gets_real_model_defaults(model, extra, task):
    for sampler in ("hf", "vllm"):
        cfg = compose([f"model={model}", f"task={task}", f"sampler={sampler}", *extra])
        assert cfg.trainer.lr <= 5e-5, "a pretrained model fine-tuned at this rate is wrecked"
        assert 0 < cfg.trainer.warmup_steps < cfg.trainer.max_steps and 0 <= cfg.trainer.min_lr_ratio <= 0.1
        assert cfg.trainer.max_seq_len >= 2048
        assert cfg.sampler.max_new_tokens >= MIN_NEW_TOKENS[task], "the E-step would cut chains of thought"
        assert cfg.eval.max_new_tokens >= MIN_NEW_TOKENS[task], "eval would cut chains of thought"
        assert cfg.sampler.max_new_tokens + 512 <= cfg.trainer.max_seq_len  # prompt + completion fit
        # The paper's E-step (ReST-EM, sec. 5): K=32 (APPS 64), T=0.7, top-k 40, <= 10 per problem, and
        # the whole training pool.
        assert cfg.sampler.num_samples == (64 if task == "apps" else 32)
        assert (cfg.sampler.temperature, cfg.sampler.top_k, cfg.snapshot.max_per_problem) == (0.7, 40, 10)
        assert cfg.task.num_train is None
        assert cfg.model.dtype in ("bfloat16", "float32") and cfg.model.name_or_path
        if model != "hf":
            assert cfg.task.prompt_style == "chat"


def test_a_model_recipe_merges_after_trainer_sampler_and_task():
    """conf/config.yaml merges model after trainer/sampler/task, so a recipe's trainer.* wins over
    conf/trainer/*.yaml, and the task's generation config wins over conf/sampler/*.yaml."""
    for trainer in ("cpu", "gpu", "ddp", "fsdp"):
        cfg = compose(["model=llama3_2_1b_instruct", "task=math", f"trainer={trainer}", "sampler=vllm"])
        assert (cfg.trainer.lr, cfg.trainer.weight_decay, cfg.trainer.max_seq_len) == (2e-5, 0.01, 4096)
        assert cfg.sampler.max_new_tokens == cfg.eval.max_new_tokens == 1024
        assert cfg.sampler.tensor_parallel_size == 1  # the engine keys stay the sampler's


def test_command_line_and_experiment_win_over_the_task_and_model_defaults():
    cfg = compose(["model=qwen2_5_0_5b_instruct", "task=gsm8k", "sampler.max_new_tokens=300",
                   "eval.max_new_tokens=200", "sampler.num_samples=4", "trainer.lr=3e-5"])  # fmt: skip
    assert (cfg.sampler.max_new_tokens, cfg.eval.max_new_tokens, cfg.sampler.num_samples) == (300, 200, 4)
    assert cfg.trainer.lr == 3e-5
    tiny = compose(["experiment=gsm8k_tiny"])
    assert (tiny.sampler.num_samples, tiny.sampler.max_new_tokens, tiny.task.num_train) == (4, 256, 64)


def test_trainer_defaults_are_for_pretrained_models():
    """Without a recipe of its own (model=hf), a pretrained model gets conf/trainer's rate on any trainer."""
    for trainer in ("cpu", "gpu", "ddp", "fsdp"):
        cfg = compose(["model=hf", "model.name_or_path=some-org/some-model", f"trainer={trainer}"])
        assert cfg.trainer.lr <= 5e-5


def test_a_pretrained_model_with_the_tiny_recipe_is_refused():
    with pytest.raises(ValueError) as err:
        compose(["model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct", "task=gsm8k"])
    message = str(err.value)
    assert message.startswith(
        "config error: model.name_or_path='Qwen/Qwen2.5-0.5B-Instruct' with model=tiny_arith"
    )
    assert (
        "trainer.lr=0.001" in message and "model=hf model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct" in message
    )
    assert "qwen2_5_0_5b_instruct" in message and "\n" not in message


def test_model_hf_needs_a_name_or_path():
    with pytest.raises(ValueError, match=r"model=hf needs model\.name_or_path=<Hub id or local folder>"):
        compose(["model=hf", "task=gsm8k"])


def test_the_smollm2_recipe_points_at_the_fetch_commands_folder():
    from factory.fetch_model import model_dir

    cfg = compose(["model=smollm2_135m_instruct", "paths.cache_dir=/data/cache"])
    assert Path(cfg.model.name_or_path) == model_dir("smollm2", cache_dir="/data/cache")
    assert cfg.model.dtype == "float32"  # CPU


def test_cfg_job_prints_the_concrete_real_model_values(tmp_path):
    """The real command, as a user runs it: `restem model=... task=gsm8k --cfg job` (no model needed)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", "from factory.loop import main; main()",
         "model=smollm2_135m_instruct", "task=gsm8k", "--cfg", "job"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    printed = OmegaConf.create(done.stdout)
    assert printed.trainer.lr == 2e-5 and printed.trainer.max_seq_len == 2048
    assert printed.sampler.max_new_tokens == printed.eval.max_new_tokens == 512
    assert (printed.sampler.num_samples, printed.sampler.temperature) == (32, 0.7)
    assert "name_or_path: ${paths.cache_dir}/models/SmolLM2-135M-Instruct" in done.stdout
    assert printed.model.name_or_path == ".cache/restem/models/SmolLM2-135M-Instruct"
    assert "lr: 2.0e-05" in done.stdout and "max_new_tokens: 512" in done.stdout


# ---- the tiny recipes compose exactly as before the real-model defaults ------------------------------

BEFORE = json.loads((Path(__file__).parent / "data" / "tiny_recipes_before.json").read_text())


def _differences(actual: dict, expected: dict, prefix: str = "") -> list[str]:
    """Keys of ``expected`` whose value differs in ``actual`` (keys added since are not compared)."""
    found = []
    for key, value in expected.items():
        if key not in actual:
            found.append(f"{prefix}{key}: missing")
        elif isinstance(value, dict):
            found += _differences(actual[key], value, f"{prefix}{key}.")
        elif actual[key] != value:
            found.append(f"{prefix}{key}: {value!r} -> {actual[key]!r}")
    return found


@pytest.mark.parametrize("experiment", sorted(k for k in BEFORE if not k.startswith("_")))
def test_tiny_recipes_compose_as_before(experiment):
    """The demo and the *_tiny smoke runs keep every value they had (trainer, sampler, eval, task, model,
    snapshot, loop), under every trainer and both samplers: the real-model defaults live elsewhere."""
    for variant, expected in BEFORE[experiment].items():
        cfg = OmegaConf.to_container(compose([f"experiment={experiment}", *variant.split()]), resolve=True)
        actual = cfg if variant.startswith("trainer=cpu") else cfg[variant.split("=")[0]]
        assert _differences(actual, expected) == [], variant


def test_every_command_in_the_real_models_doc_composes():
    """docs/real_models.md's restem commands compose with the values the doc's tables state."""
    import re
    import shlex

    text = (REPO / "docs" / "real_models.md").read_text()
    commands = [
        shlex.split(line.split(" #")[0])[1:]
        for block in re.findall(r"```bash\n(.*?)```", text, re.S)
        for line in block.replace("\\\n", " ").splitlines()
        if line.startswith((".venv/bin/restem ", "restem "))
    ]
    assert len(commands) >= 8
    for args in commands:
        cfg = compose(args)
        assert cfg.name != "arith_demo" and cfg.trainer.lr <= 5e-5, args
        assert cfg.sampler.max_new_tokens == MIN_NEW_TOKENS[cfg.task.name], args
