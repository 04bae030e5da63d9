"""Every config composes; typos and bad values fail at compose time naming the key."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError

from factory.config import CONF_DIR, compose


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["task", "model", "sampler", "trainer", "paths", "experiment"])
def test_every_option_of_every_group_composes(group):
    options = _options(group)
    assert options, f"conf/{group} has no yaml files"
    for option in options:
        cfg = compose([f"{group}={option}"])
        assert cfg.paths.run_dir


def test_default_is_the_arith_demo():
    cfg = compose()
    assert cfg.name == "arith_demo"
    assert cfg.task.name == "arith"
    assert cfg.model.name == "tiny_arith"
    assert cfg.paths.run_dir == "runs/arith_demo"
    assert cfg.snapshot.max_per_problem == 10
    assert cfg.loop.iterations == 3


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
