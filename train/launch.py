"""Multi-process M-steps from a single-process program (the ReST-EM loop): one torchrun job per fit.

Lightning's own launcher for ``ddp``/``fsdp`` re-runs the whole command line once per extra device, which
suits a single ``restem-train`` but not the loop (each rank would redo the loop, and a second fit in the
same process finds no ranks to talk to). So when a fit needs several processes and this process was not
started by a launcher, the fit runs as ``torchrun --standalone --nproc_per_node=N -m train.launch JOB``
and this process waits for its finished model folder. Several nodes need a launcher on every node:
run the stage commands there (``srun restem-train ...`` or ``torchrun ... restem-train ...``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from factory.rundir import read_json, write_json
from train.finetune import fine_tune_base
from train.strategy import num_processes

_LAUNCHED = ("LOCAL_RANK", "WORLD_SIZE", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK")


def needs_launch(settings: DictConfig) -> bool:
    """Whether the fit needs processes that nobody has started (one node, several devices, no launcher)."""
    launched = any(name in os.environ for name in _LAUNCHED)
    return not launched and int(settings.num_nodes) == 1 and num_processes(settings) > 1


def launch_fit(
    *,
    base_path,
    export_dtype: str,
    pairs: list[dict],
    out_dir: Path,
    settings: DictConfig,
    desc: str,
    extra_info: dict,
    tracking: dict | None = None,
) -> dict:
    """Runs ``fine_tune_base`` under torchrun and returns the finished stage's info."""
    out_dir = Path(out_dir)
    job = out_dir.with_name(f".{out_dir.name}.launch")
    shutil.rmtree(job, ignore_errors=True)
    job.mkdir(parents=True)
    write_json(
        job / "job.json",
        {
            "base_path": str(base_path),
            "export_dtype": export_dtype,
            "out_dir": str(out_dir),
            "settings": OmegaConf.to_container(settings, resolve=True),
            "desc": desc,
            "extra_info": extra_info,
            "tracking": tracking,
        },
    )
    (job / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={num_processes(settings)}", "-m", "train.launch", str(job),
    ]  # fmt: skip
    done = subprocess.run(command, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"{desc}: the {settings.strategy} job failed (exit {done.returncode}); see its log above"
        )
    shutil.rmtree(job, ignore_errors=True)
    return read_json(out_dir / "stage.json")


def _worker(job: Path) -> None:
    spec = read_json(job / "job.json")
    pairs = [json.loads(line) for line in (job / "pairs.jsonl").read_text(encoding="utf-8").splitlines()]
    fine_tune_base(
        base_path=spec["base_path"],
        pairs=pairs,
        out_dir=Path(spec["out_dir"]),
        settings=OmegaConf.create(spec["settings"]),
        export_dtype=spec["export_dtype"],
        desc=spec["desc"],
        extra_info=spec["extra_info"],
        tracking=spec.get("tracking"),
    )


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
