"""Every shipped config runs as its header says: the commands in each raylin/configs/*.yaml header
(`raylin finetune`, `convert`, `eval`, `tune`, and `ray job submit ... python jobs/<command>.py`),
in the order written, from one working folder as a user's checkout, in a quick form.

The quick form only shortens: the same `--set` caps on every command (steps, examples, lengths,
align and broad sizes). Where a header's command reads what a full-length run makes (a sweep's
waypoints are the snapshots of a 400-step fine-tuning) or searches a large grid, QUICK_EXTRA says
what the quick form points it at instead, and why. A config whose teacher only the Hub has is
validated offline instead (tests/test_cluster.py) and named in HUB_ONLY.

Each command runs in this process on a Ray of its own, shut down after it, as a user's separate
commands would. `ray job submit --working-dir . -- python jobs/convert.py X` runs its entrypoint
(`job_main`); the submission itself is tested against a real head in tests/test_jobs.py.

Slow as a whole (7.5 minutes on 2 cores from a clean clone): `make test-configs`, which .ci/run runs too.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import pytest
import ray

from raylin.cli import job_main, main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "raylin" / "configs").glob("*.yaml"))

# Appended to every raylin command of every header: shorter runs, same code paths.
QUICK = ["train.max_steps=4", "train.checkpoint_every=2", "train.warmup_steps=1", "train.eval_every=2",
         "train.batch_size=4", "data.max_train_examples=32", "data.max_eval_examples=16", "data.max_length=32",
         "data.size=quick", "align.steps=2", "align.batch_size=2", "broad.examples=8"]
QUICK_EXTRA = {
    # The sweep's waypoints are the snapshots of the 400-step fine-tuning its header runs first; the
    # quick fine-tuning writes them at steps 2 and 4. Two guidance modes (one of them waypoint) of the
    # ten-trial grid keep the sweep a minute long.
    "minilm-rt-linformer-sweep.yaml": [
        "guidance.waypoints=[{step: 2, path: outputs/minilm-rt-teacher/snapshots/step_2}, "
        "{step: 4, path: outputs/minilm-rt-teacher/snapshots/step_4}]",
        "guidance.hybrid_cutoff=2", "tune.space={guidance.mode: {grid: [target, waypoint]}}"],
    # Every layout the search proposes trains a SmolLM2 student: the evenly spaced and the most
    # important layouts, no sampled ones; the importance from one probe batch.
    "smollm2-austen-layout-sweep.yaml": ["tune.layout.samples=0", "tune.layout.probe_batches=1"],
}
HUB_ONLY = {"tinyllama-1.1b-mamba2-hybrid.yaml": "TinyLlama-1.1B's weights come from the Hub only"}
COMMAND = re.compile(r"^#\s{2,}((?:raylin|ray job submit)\s.*)$")  # indented: prose may start with "raylin"


def header_commands(path: Path) -> list[list[str]]:
    """The commands a config's header tells users to run, in order, as argument lists (optional
    ``[...]`` parts left out)."""
    header = path.read_text().split("\nteacher:")[0]
    commands = []
    for line in header.splitlines():
        match = COMMAND.match(line)
        if match:
            commands.append(shlex.split(re.sub(r"\[[^]]*\]", "", match.group(1))))
    return commands


def test_every_shipped_config_header_names_its_commands():
    for path in CONFIGS:
        commands = header_commands(path)
        assert commands, f"{path.name}: its header names no command to run it"
        for words in commands:
            configs = [w for w in words if w.startswith("raylin/configs/")]
            assert configs and all((ROOT / c).is_file() for c in configs), (path.name, words)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A user's working folder: jobs/ and raylin/configs/ as in the repository, outputs/ written
    here; a private Ray."""
    folder = tmp_path_factory.mktemp("checkout")
    (folder / "jobs").symlink_to(ROOT / "jobs")
    (folder / "raylin").mkdir()
    (folder / "raylin" / "configs").symlink_to(ROOT / "raylin" / "configs")
    previous = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = "local"
    yield folder
    ray.shutdown()
    if previous is None:
        os.environ.pop("RAY_ADDRESS", None)
    else:
        os.environ["RAY_ADDRESS"] = previous


def _quick(words: list[str], config_name: str) -> list[str]:
    extra = QUICK_EXTRA.get(config_name, []) if words[0] == "tune" else []
    return [*words, *[arg for item in [*QUICK, *extra] for arg in ("--set", item)]]


def _run(words: list[str], config_name: str, capsys) -> str:
    """Run one header command in this process; its standard output."""
    if words[:3] == ["ray", "job", "submit"]:
        entrypoint = words[words.index("--") + 1:]
        assert entrypoint[:1] == ["python"] and entrypoint[1].startswith("jobs/"), words
        command = Path(entrypoint[1]).stem
        code = job_main(command, _quick([command, *entrypoint[2:]], config_name)[1:])
    else:
        assert words[0] == "raylin", words
        code = main(_quick(words[1:], config_name))
    ray.shutdown()  # each command is a process of its own for a user: its Ray ends with it
    captured = capsys.readouterr()
    assert code == 0, f"{shlex.join(words)} exited {code}:\n{captured.err[-4000:]}"
    assert "Traceback" not in captured.err, captured.err[-4000:]
    return captured.out


@pytest.mark.configs
@pytest.mark.assets
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_a_shipped_config_runs_as_its_header_says(path, checkout, monkeypatch, capsys):
    if path.name in HUB_ONLY:
        pytest.skip(f"{HUB_ONLY[path.name]}: validated offline in tests/test_cluster.py")
    monkeypatch.chdir(checkout)
    for words in header_commands(path):
        out = _run(words, path.name, capsys)
        if {"convert", "finetune", "jobs/convert.py", "jobs/finetune.py"} & set(words):  # a run: its metrics
            result = json.loads(out[out.index("\n{") + 1:] if not out.startswith("{") else out)
            assert result["steps"] == 4, result
