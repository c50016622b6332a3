"""Security posture (issue 24, docs/reliability.md), checked on the source: no pickle of files
raylin did not write itself without ``weights_only``, no remote code, Ray's dashboard and job
server bound to localhost, token authentication left on."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sorted(p for folder in ("raylin", "jobs", "benchmarks", "tests") for p in (ROOT / folder).rglob("*.py"))
COMMANDS = sorted([*ROOT.glob("*.md"), *(ROOT / "docs").rglob("*.md"), *(ROOT / "jobs").rglob("*"),
                   *(ROOT / "raylin" / "configs").rglob("*"), *(ROOT / "cluster").rglob("*"), *(ROOT / ".ci").rglob("*"),
                   ROOT / "Makefile"])
UNSAFE_LOADERS = {("pickle", "load"), ("pickle", "loads"), ("cloudpickle", "load"), ("cloudpickle", "loads"),
                  ("dill", "load"), ("dill", "loads"), ("joblib", "load")}
LOCALHOST = ("127.0.0.1", "localhost")
POLICY_FILES = ("test_security.py", "reliability.md")  # this test and the page stating the policy


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name):
            yield node, (node.func.value.id, node.func.attr)


def _keyword(call: ast.Call, name: str):
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value.value if isinstance(keyword.value, ast.Constant) else keyword.value
    return None


def test_every_torch_load_refuses_pickled_code_and_nothing_unpickles_files():
    violations = []
    for path in PYTHON:
        for call, (owner, attr) in _calls(path):
            where = f"{path.relative_to(ROOT)}:{call.lineno}"
            if (owner, attr) == ("torch", "load") and _keyword(call, "weights_only") is not True:
                violations.append(f"{where}: torch.load without weights_only=True")
            if (owner, attr) in UNSAFE_LOADERS:
                violations.append(f"{where}: {owner}.{attr} runs whatever code the file holds")
    assert not violations, violations


def test_no_remote_code_is_trusted():
    violations = [f"{path.relative_to(ROOT)}:{call.lineno}" for path in PYTHON for call, _ in _calls(path)
                  if _keyword(call, "trust_remote_code") is True]
    assert not violations, violations


def test_ray_dashboards_and_job_servers_listen_on_localhost_and_token_auth_stays_on():
    violations = []
    for path in PYTHON:
        for call, (owner, attr) in _calls(path):
            host = _keyword(call, "dashboard_host")
            if (owner, attr) == ("ray", "init") and host is not None and host not in LOCALHOST:
                violations.append(f"{path.relative_to(ROOT)}:{call.lineno}: ray.init(dashboard_host={host!r})")
    for path in [*PYTHON, *(p for p in COMMANDS if p.is_file())]:
        if path.name in POLICY_FILES:
            continue  # they name what is forbidden
        text = path.read_text(errors="ignore")
        for match in re.finditer(r"--dashboard-host[= ](\S+)", text):
            if match.group(1).strip("\"',") not in LOCALHOST:
                violations.append(f"{path.relative_to(ROOT)}: ray start {match.group(0)}")
        if "0.0.0.0" in text:
            violations.append(f"{path.relative_to(ROOT)}: binds 0.0.0.0")
        if re.search(r"RAY_AUTH_MODE\W+disabled", text):
            violations.append(f"{path.relative_to(ROOT)}: turns Ray's token authentication off")
    assert not violations, violations
