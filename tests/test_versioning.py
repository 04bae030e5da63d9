"""Content-addressed versions: the policy is identified by its weights, not its path."""

from __future__ import annotations

import pytest

from factory.versioning import FINGERPRINT_FILE, check_snapshot_version, weights_fingerprint


def _model(folder, weights: bytes, seconds: float):
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "config.json").write_text('{"hidden_size": 64}')
    (folder / "stage.json").write_text(f'{{"seconds": {seconds}}}')
    return folder


def test_weights_fingerprint_follows_content_not_path_or_timings(tmp_path):
    a = weights_fingerprint(_model(tmp_path / "a", b"\x00\x01", 1.0))
    assert weights_fingerprint(_model(tmp_path / "b", b"\x00\x01", 2.5)) == a
    assert weights_fingerprint(_model(tmp_path / "c", b"\x00\x02", 1.0)) != a
    assert (tmp_path / "a" / FINGERPRINT_FILE).is_file()
    (tmp_path / "a" / "model.safetensors").write_bytes(b"\x00\x03\x04")  # changed size: recomputed
    assert weights_fingerprint(tmp_path / "a") != a
    assert weights_fingerprint("Qwen/Qwen2.5-0.5B-Instruct") == weights_fingerprint(
        "Qwen/Qwen2.5-0.5B-Instruct"
    )


def test_version_check_names_the_changed_inputs(tmp_path):
    (tmp_path / "manifest.json").write_text(
        '{"version": "aaaa", "inputs": {"sampler": {"temperature": 0.8}, "seed": 0}}'
    )
    check_snapshot_version(tmp_path, "aaaa", {})  # same version: reused
    check_snapshot_version(tmp_path / "missing", "bbbb", {})  # nothing there yet
    with pytest.raises(FileExistsError, match=r"changed: sampler\.temperature\)"):
        check_snapshot_version(tmp_path, "bbbb", {"sampler": {"temperature": 0.7}, "seed": 0})
