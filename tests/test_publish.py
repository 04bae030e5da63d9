"""Publishing: the local export read back with datasets.load_dataset, and the Hub push over real HTTP
to a local fake Hub (huggingface_hub's own client, a 412 from a concurrent push and a 429 retried)."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import polars as pl
import pytest
import yaml
from datasets import load_dataset, load_from_disk

from factory import publish
from factory.card import read_lineage
from factory.export import export_run
from factory.snapshot import build_snapshot


def _fake_run(root, versions: dict[int, str], *, n: int = 3):
    """A run dir with one finished snapshot per iteration (problem p<i> solved by sample 0 and 1)."""
    for k, version in versions.items():
        rows = [(f"p{i}", j, f"{k}: {i}+{j}={i + j}", float(j < 2)) for i in range(n) for j in range(3)]
        samples = pl.DataFrame(
            {
                "problem_id": [r[0] for r in rows],
                "sample_idx": pl.Series([r[1] for r in rows], dtype=pl.Int32),
                "prompt": [f"Q{r[0]}" for r in rows],
                "completion": [r[2] for r in rows],
                "num_tokens": pl.Series([5] * len(rows), dtype=pl.Int32),
            }
        )
        verdicts = samples.select(["problem_id", "sample_idx"]).with_columns(
            reward=pl.Series([r[3] for r in rows]),
            status=pl.Series(["correct" if r[3] else "wrong" for r in rows]),
            answer=pl.lit("1"),
            steps_valid=pl.lit(True),
        )
        for name, frame in (("samples", samples), ("verdicts", verdicts)):
            (root / f"iter_{k}" / name).mkdir(parents=True)
            frame.write_parquet(root / f"iter_{k}" / name / "shard-00000.parquet")
        build_snapshot(
            samples_dir=root / f"iter_{k}" / "samples",
            verdicts_dir=root / f"iter_{k}" / "verdicts",
            out_dir=root / f"iter_{k}" / "dataset",
            max_per_problem=10,
            dedupe=True,
            lineage={
                "iteration": k,
                "task": "arith",
                "base_model": "base",
                "policy": "pol",
                "version": version,
            },
            settings={},
        )
    return root


def test_export_round_trips_through_load_dataset(tmp_path):
    run = _fake_run(tmp_path / "run", {1: "a" * 64, 2: "b" * 64})
    out = tmp_path / "export"
    assert export_run(run, out)["exported"] == ["iter_1", "iter_2"]
    for k in (1, 2):
        loaded = load_dataset(str(out), name=f"iter_{k}", split="train")
        original = load_from_disk(str(run / f"iter_{k}" / "dataset"))["train"]
        assert loaded.to_list() == original.to_list() and len(loaded) == 6
    meta = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert [c["config_name"] for c in meta["configs"]] == ["iter_1", "iter_2"]
    assert meta["restem"]["iter_2"]["version"] == "b" * 64
    assert meta["restem"]["iter_1"]["status_counts"] == {"correct": 6, "wrong": 3}
    assert {i["config_name"] for i in meta["dataset_info"]} == {"iter_1", "iter_2"}
    assert meta["license"] and "rest-em" in meta["tags"]

    # The same snapshots again: nothing written. Another version under a taken name: refused.
    before = (out / "iter_1" / "train-00000-of-00001.parquet").stat().st_mtime_ns
    assert export_run(run, out) == {"exported": [], "skipped": ["iter_1", "iter_2"], "path": str(out)}
    assert (out / "iter_1" / "train-00000-of-00001.parquet").stat().st_mtime_ns == before
    other = _fake_run(tmp_path / "other", {1: "c" * 64})
    with pytest.raises(FileExistsError, match="never overwritten"):
        export_run(other, out)
    # ...unless it gets its own config name (a sweep point's prefix); earlier configs are kept.
    assert export_run(other, out, prefix="K8-")["exported"] == ["K8-iter_1"]
    assert set(read_lineage(out / "README.md")) == {"iter_1", "iter_2", "K8-iter_1"}
    assert len(load_dataset(str(out), name="K8-iter_1", split="train")) == 6
    assert len(load_dataset(str(out), name="iter_2", split="train")) == 6


class FakeHub:
    """The few Hub endpoints a dataset push uses, with a git-like commit sha and parent checks."""

    def __init__(self, repo: str):
        self.repo, self.files, self.sha = repo, {}, hashlib.sha1(b"init").hexdigest()
        self.requests: list[tuple[str, str, int]] = []
        self.fail_next: dict[str, list[int]] = {}  # endpoint kind -> statuses to answer first
        self.before_commit = None  # called once before the next commit (a concurrent push)

    def commit(self, files: dict[str, bytes]) -> None:
        self.files.update(files)
        self.sha = hashlib.sha1(self.sha.encode() + json.dumps(sorted(files)).encode()).hexdigest()

    def card_data(self) -> dict | None:
        readme = self.files.get("README.md")
        return yaml.safe_load(readme.decode().split("---")[1]) if readme else None


def _serve(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _reply(self, kind: str, status: int, body: dict, headers: dict | None = None):
            self.requests_append(kind, status)
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def requests_append(self, kind, status):
            hub.requests.append((self.command, kind, status))

        def _injected(self, kind: str) -> bool:
            pending = hub.fail_next.get(kind) or []
            if pending:
                status = pending.pop(0)
                self._reply(kind, status, {"error": f"injected {status}"}, {"Retry-After": "0"})
                return True
            return False

        def do_GET(self):
            if self.path.split("?")[0] == f"/api/datasets/{hub.repo}":
                if self._injected("info"):
                    return
                siblings = [{"rfilename": p} for p in sorted(hub.files)]
                body = {"id": hub.repo, "sha": hub.sha, "siblings": siblings, "cardData": hub.card_data()}
                return self._reply("info", 200, body)
            self._reply("unknown", 404, {"error": self.path})

        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            path = self.path.split("?")[0]
            if path == "/api/repos/create":
                return self._reply("create", 200, {"url": f"{hub.endpoint}/datasets/{hub.repo}"})
            if path == "/api/validate-yaml":
                return self._reply("validate", 200, {})
            if path == f"/api/datasets/{hub.repo}/preupload/main":
                files = json.loads(raw)["files"]
                modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                return self._reply("preupload", 200, {"files": modes})
            if path == f"/api/datasets/{hub.repo}/commit/main":
                concurrent, hub.before_commit = hub.before_commit, None
                if concurrent:
                    concurrent()
                if self._injected("commit"):
                    return
                lines = [json.loads(x) for x in raw.decode().splitlines() if x]
                header = next(x["value"] for x in lines if x["key"] == "header")
                if header.get("parentCommit") not in (None, hub.sha):
                    return self._reply(
                        "commit", 412, {"error": "A commit has happened since. Please refresh"}
                    )
                hub.commit(
                    {
                        x["value"]["path"]: base64.b64decode(x["value"]["content"])
                        for x in lines
                        if x["key"] == "file"
                    }
                )
                url = f"{hub.endpoint}/datasets/{hub.repo}/commit/{hub.sha}"
                return self._reply("commit", 200, {"commitUrl": url, "commitOid": hub.sha})
            self._reply("unknown", 404, {"error": path})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    hub.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def fake_hub(monkeypatch):
    hub = FakeHub("me/restem-data")
    server = _serve(hub)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    yield hub
    server.shutdown()
    server.server_close()


def test_push_retries_after_412_and_429_and_never_overwrites(tmp_path, fake_hub):
    run = _fake_run(tmp_path / "run", {1: "a" * 64, 2: "b" * 64})
    other = _fake_run(tmp_path / "other", {1: "c" * 64})
    waits: list[float] = []
    # Another sweep job pushes its config between our read and our commit: the Hub answers 412.
    fake_hub.before_commit = lambda: publish.publish_run(
        other, fake_hub.repo, prefix="K8-", endpoint=fake_hub.endpoint, sleep=waits.append
    )
    fake_hub.fail_next = {"info": [429]}
    result = publish.publish_run(run, fake_hub.repo, endpoint=fake_hub.endpoint, sleep=waits.append)
    assert result["pushed"] == ["iter_1", "iter_2"] and result["attempts"] == 3
    assert result["commit"] == fake_hub.sha
    assert [s for m, kind, s in fake_hub.requests if kind == "commit"] == [200, 412, 200]
    assert len(waits) == 2 and all(w > 0 for w in waits)  # one backoff per retried answer
    # The merged card lists both jobs' configs; the data is the snapshot's, byte for byte readable.
    card = fake_hub.card_data()
    assert [c["config_name"] for c in card["configs"]] == ["iter_1", "iter_2", "K8-iter_1"]
    assert card["restem"]["iter_2"]["version"] == "b" * 64
    assert set(fake_hub.files) == {
        "README.md",
        "iter_1/train-00000-of-00001.parquet",
        "iter_2/train-00000-of-00001.parquet",
        "K8-iter_1/train-00000-of-00001.parquet",
    }
    pushed = tmp_path / "pushed.parquet"
    pushed.write_bytes(fake_hub.files["iter_2/train-00000-of-00001.parquet"])
    original = load_from_disk(str(run / "iter_2" / "dataset"))["train"].to_polars()
    assert pl.read_parquet(pushed).equals(original)

    # Pushing again commits nothing; another version under a taken config name is refused.
    commits = len([r for r in fake_hub.requests if r[1] == "commit"])
    again = publish.publish_run(run, fake_hub.repo, endpoint=fake_hub.endpoint, sleep=waits.append)
    assert again["pushed"] == [] and again["commit"] is None
    assert len([r for r in fake_hub.requests if r[1] == "commit"]) == commits
    with pytest.raises(FileExistsError, match="never overwritten"):
        publish.publish_run(other, fake_hub.repo, endpoint=fake_hub.endpoint, sleep=waits.append)


def test_push_gives_up_after_max_attempts_and_needs_a_token(tmp_path, fake_hub, monkeypatch):
    from huggingface_hub.errors import HfHubHTTPError

    run = _fake_run(tmp_path / "run", {1: "a" * 64})
    fake_hub.fail_next = {"commit": [412, 412, 412]}
    with pytest.raises(HfHubHTTPError):
        publish.publish_run(
            run, fake_hub.repo, endpoint=fake_hub.endpoint, max_attempts=3, sleep=lambda s: None
        )
    assert "README.md" not in fake_hub.files
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(ValueError, match="HF_TOKEN"):
        publish.publish_run(run, fake_hub.repo, endpoint=fake_hub.endpoint)


def test_publish_command_exports_and_reports_errors(tmp_path, capsys):
    run = _fake_run(tmp_path / "run", {1: "a" * 64})
    publish.main([str(run), "--to-dir", str(tmp_path / "out")])
    assert "iter_1" in capsys.readouterr().out
    assert len(load_dataset(str(tmp_path / "out"), name="iter_1", split="train")) == 6
    with pytest.raises(SystemExit):
        publish.main([str(tmp_path / "empty"), "--to-dir", str(tmp_path / "out2")])
    # One error line naming the problem; progress bars written to stderr before it are not part of it.
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: no finished snapshot")
