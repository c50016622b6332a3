"""cluster/ and raylin/configs/: every file parses, has what it needs, and the clusters hold the runs.

Launcher YAMLs go through Ray's own schema (``prepare_config`` + ``validate_config``, what
``ray up`` runs first); KubeRay manifests are checked field by field against what the operator
needs. Each run config is validated the way ``raylin convert`` validates it, and its Ray Train
workers plus the node's teacher replica must fit on a worker type of every cluster definition.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from raylin.config import ConfigError, config_from_dict
from raylin.models.teachers import paper_teacher_architecture
from raylin.train.trainer import teacher_replica_resources, worker_resources

ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = [ROOT / "cluster" / "aws.yaml", ROOT / "cluster" / "gcp.yaml"]
KUBERAY = ROOT / "cluster" / "kuberay"
RUN_CONFIGS = sorted((ROOT / "raylin" / "configs").rglob("*.yaml"))
GPU_KEY = "nvidia.com/gpu"


def pinned(package: str) -> str:
    for line in (ROOT / "constraints-cpu.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        if name.split("[")[0].strip() == package:
            return version.strip()
    raise AssertionError(f"{package} is not pinned in constraints-cpu.txt")


def _architecture(tmp_path_factory, hub_id: str) -> str:
    """A folder with ``hub_id``'s config.json only (no weights, no Hub), to validate the paper configs offline."""
    folder = tmp_path_factory.mktemp(hub_id.rsplit("/", 1)[-1])
    paper_teacher_architecture(hub_id).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def roberta_base(tmp_path_factory) -> str:
    return _architecture(tmp_path_factory, "roberta-base")


@pytest.fixture(scope="module")
def pythia_1b(tmp_path_factory) -> str:
    return _architecture(tmp_path_factory, "EleutherAI/pythia-1b")


@pytest.fixture(scope="module")
def wav2vec2_large(tmp_path_factory) -> str:
    return _architecture(tmp_path_factory, "facebook/wav2vec2-large-lv60")


@pytest.fixture(scope="module")
def tinyllama(tmp_path_factory) -> str:
    return _architecture(tmp_path_factory, "TinyLlama/TinyLlama_v1.1")


def load_run_config(path: Path, roberta_base: str, pythia_1b: str | None = None, wav2vec2_large: str | None = None,
                    tinyllama: str | None = None):
    """The config as `raylin convert` would validate it, with teachers that exist offline."""
    data = yaml.safe_load(path.read_text())
    data.pop("tune", None)
    offline = {"roberta-base": roberta_base, "EleutherAI/pythia-1b": pythia_1b,
               "facebook/wav2vec2-large-lv60": wav2vec2_large, "TinyLlama/TinyLlama_v1.1": tinyllama}
    teacher = offline.get(data["teacher"]) or data["teacher"]
    return config_from_dict(data, [f"teacher={teacher}", f"target_teacher={teacher}"])


# ----- launcher YAMLs -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_yaml_passes_rays_schema(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text())
    validate_config(prepare_config(config))
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0, "the head schedules no training"
    workers = {name: spec for name, spec in config["available_node_types"].items() if name != config["head_node_type"]}
    assert workers and all(spec["min_workers"] == 0 and spec["resources"]["GPU"] >= 1 for spec in workers.values())
    assert config["docker"]["image"].startswith(f"rayproject/ray:{pinned('ray')}-"), "image Ray == tested Ray"
    assert any("pip install" in cmd and "raylin" in cmd for cmd in config["setup_commands"])
    assert config["file_mounts"] == {"/home/ray/raylin": "."}


def test_launcher_schema_rejects_a_misspelt_key():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(LAUNCHERS[0].read_text())
    config["available_node_types"]["gpu_1x"]["min_worker"] = 0  # typo of min_workers
    with pytest.raises(Exception, match="min_worker"):
        validate_config(prepare_config(config))


# ----- KubeRay manifests ----------------------------------------------------------------------------


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _check_ray_cluster_spec(spec: dict, claims: set[str]) -> None:
    assert spec["rayVersion"] == pinned("ray") and spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert GPU_KEY not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1 and group["replicas"] == 0
        container = group["template"]["spec"]["containers"][0]
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert limits == requests and int(limits[GPU_KEY]) >= 1
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["shared"] == "/mnt/shared"
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        assert volumes["shared"]["persistentVolumeClaim"]["claimName"] in claims
        assert container["image"] == head["template"]["spec"]["containers"][0]["image"]


def test_kuberay_raycluster_manifest():
    docs = _documents(KUBERAY / "raycluster.yaml")
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    assert all(d["spec"]["accessModes"] == ["ReadWriteMany"] for d in docs if d["kind"] == "PersistentVolumeClaim")
    (cluster,) = [d for d in docs if d["kind"] == "RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    _check_ray_cluster_spec(cluster["spec"], claims)


def test_kuberay_rayjob_manifest_runs_files_that_exist():
    (job,) = _documents(KUBERAY / "rayjob.yaml")
    claims = {d["metadata"]["name"] for d in _documents(KUBERAY / "raycluster.yaml") if d["kind"] == "PersistentVolumeClaim"}
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    _check_ray_cluster_spec(job["spec"]["rayClusterSpec"], claims)
    words = job["spec"]["entrypoint"].replace('"', " ").split()
    scripts = [w for w in words if w.startswith("jobs/") and w.endswith(".py")]
    configs = [w for w in words if w.startswith("raylin/configs/")]
    assert scripts == ["jobs/finetune.py", "jobs/convert.py"] and configs
    assert all((ROOT / path).is_file() for path in scripts + configs)
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["working_dir"] == "/home/ray/raylin"
    dockerfile = (ROOT / "cluster" / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{pinned('ray')}-" in dockerfile and "/home/ray/raylin" in dockerfile


# ----- run configs against the clusters ------------------------------------------------------------


def node_types() -> dict[str, dict[str, float]]:
    """Every worker type of every cluster definition: {"file:type": {"CPU", "GPU", "max"}}."""
    types = {}
    for path in LAUNCHERS:
        config = yaml.safe_load(path.read_text())
        for name, spec in config["available_node_types"].items():
            if name != config["head_node_type"]:
                types[f"{path.name}:{name}"] = {**spec["resources"], "max": spec["max_workers"]}
    for doc in _documents(KUBERAY / "raycluster.yaml"):
        if doc["kind"] == "RayCluster":
            for group in doc["spec"]["workerGroupSpecs"]:
                limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
                types[f"raycluster.yaml:{group['groupName']}"] = {
                    "CPU": float(limits["cpu"]), "GPU": float(limits[GPU_KEY]), "max": group["maxReplicas"]}
    return types


def workers_per_node(config, node: dict[str, float]) -> int:
    """How many of the run's workers one node holds next to its teacher replica (Ray packs a
    fractional GPU request into a single GPU, so each GPU holds floor(1 / gpus_per_worker) workers
    and the replica must fit in one GPU's remainder)."""
    worker = worker_resources(config, use_gpu=True)
    replica = teacher_replica_resources(config) if config.teacher_service.mode == "served" else {"CPU": 0}
    gpus, per_gpu = int(node["GPU"]), int(1 // worker["GPU"] + 1e-9)
    count = gpus * per_gpu
    if replica.get("GPU", 0) > 0:  # the replica takes the remainder of one GPU, or a whole one
        remainder = 1 - per_gpu * worker["GPU"]
        if remainder + 1e-9 < replica["GPU"]:
            count -= math.ceil(replica["GPU"] / worker["GPU"]) if replica["GPU"] >= worker["GPU"] else 1
    by_cpu = int((node["CPU"] - replica["CPU"]) // worker["CPU"])
    return max(0, min(count, by_cpu))


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "raylin" / "configs")))
def test_run_config_validates_and_fits_the_clusters(path, roberta_base, pythia_1b, wav2vec2_large, tinyllama):
    config = load_run_config(path, roberta_base, pythia_1b, wav2vec2_large, tinyllama)
    header = path.read_text().split("\nteacher:")[0]
    assert "Expected resources:" in header, f"{path.name} must state its expected resources in its header"
    if not config.train.use_gpu:
        return  # CPU runs: a laptop or any node
    fits = {name: workers_per_node(config, node) * node["max"] for name, node in node_types().items()}
    clusters = {name.split(":")[0] for name, holds in fits.items() if holds >= config.train.num_workers}
    assert clusters == {"aws.yaml", "gcp.yaml", "raycluster.yaml"}, f"{path.name} fits nowhere on {set(fits) - clusters}: {fits}"


def test_paper_configs_follow_the_reference_recipe(roberta_base):
    """10 epochs at batch 32 with 6 % warmup and the paper's hybrid cut-offs, k=256, T=2."""
    cutoffs = {"sst2": 5000, "qnli": 10000, "qqp": 40000, "imdb": 3000}
    for task, cutoff in cutoffs.items():
        config = load_run_config(ROOT / "raylin" / "configs" / "paper" / f"roberta-{task}-linformer.yaml", roberta_base)
        t = config.train
        assert (t.batch_size, config.plan.options["linformer"].k, config.loss.temperature) == (32, 256, 2.0)
        assert config.guidance.hybrid_cutoff == cutoff and t.max_steps == 10 * t.checkpoint_every
        assert round(t.warmup_steps / t.max_steps, 3) == 0.06
        assert [w.step for w in config.guidance.waypoints] == [t.checkpoint_every * (e + 1) for e in range(10)]


def test_paper_speech_configs_follow_the_reference_recipe(roberta_base, wav2vec2_large):
    """90k steps, 5k warmup, lr 3e-4, layer-normed MSE on all 24 layer outputs with the paper's alphas and
    hybrid cut-offs, waypoints every 10k steps, fresh bidirectional Mamba2 mixers (expand 1, state 128)."""
    recipe = {"tedlium": ("ctc", 15.0, 1.0, 40000), "slurp": ("utterance_classification", 15.0, 0.0, 30000),
              "voxceleb1": ("utterance_classification", 30.0, 0.0, 50000)}
    for name, (task, alpha_layer, alpha_out, cutoff) in recipe.items():
        path = ROOT / "raylin" / "configs" / "paper" / f"wav2vec2-large-{name}-bimamba2.yaml"
        config = load_run_config(path, roberta_base, wav2vec2_large=wav2vec2_large)
        t, loss = config.train, config.loss
        assert config.task.type == task and config.data.name == "hub_audio"
        assert (t.max_steps, t.warmup_steps, t.lr, t.weight_decay, t.grad_clip) == (90000, 5000, 3e-4, 5e-3, 1.0)
        assert (loss.alpha_layer, loss.alpha_out, loss.normalization, loss.reduction) == (alpha_layer, alpha_out, "layernorm", "mean")
        assert loss.layers == list(range(1, 25)) and config.guidance.hybrid_cutoff == cutoff
        assert [w.step for w in config.guidance.waypoints] == list(range(10000, 90001, 10000))
        plan = config.plan
        assert (plan.mixer, plan.init, plan.options["mamba2"].expand, plan.options["mamba2"].state_size) == ("bimamba2", "default", 1, 128)
    assert load_run_config(ROOT / "raylin" / "configs" / "paper" / "wav2vec2-large-voxceleb1-bimamba2.yaml", roberta_base,
                           wav2vec2_large=wav2vec2_large).task.num_labels == 1251


def test_a_config_that_cannot_fit_is_caught(roberta_base):
    config = load_run_config(ROOT / "raylin" / "configs" / "paper" / "roberta-sst2-linformer.yaml", roberta_base)
    config.teacher_service.gpus = 0.5  # next to 0.75-GPU workers it needs a GPU of its own
    assert workers_per_node(config, {"CPU": 48, "GPU": 4, "max": 1}) == 3
    with pytest.raises(ConfigError, match="gpus_per_worker"):
        config_from_dict(yaml.safe_load((ROOT / "raylin" / "configs" / "minilm-rt-linformer.yaml").read_text()),
                         ["train.gpus_per_worker=1.5", "target_teacher=asset:all-minilm-l6"])


def test_served_bytes_of_the_paper_configs_follow_their_shapes():
    """`raylin bench cluster`'s extrapolation: positions per worker x served states x width x 2 bytes (bf16),
    plus per-position logits only where the KL term is on for per-position outputs."""
    from raylin.bench.cluster import paper_extrapolation

    rows = {row["config"]: row for row in paper_extrapolation()}
    assert set(rows) == {path.stem for path in (ROOT / "raylin" / "configs" / "paper").glob("*.yaml")}
    pythia = rows["pythia-1b-pile-mamba"]  # 128 x 2,048 tokens over 4 workers; layers 1..15; alpha_out 0
    assert pythia["bytes_per_worker_step"] == 32 * 2048 * 15 * 2048 * 2
    assert pythia["bytes_per_node_step"] == 4 * pythia["bytes_per_worker_step"]
    roberta = rows["roberta-sst2-linformer"]  # 32 x 512 over 4 workers; all 13 states
    assert roberta["bytes_per_worker_step"] == 8 * 512 * 13 * 768 * 2
    tedlium = rows["wav2vec2-large-tedlium-bimamba2"]  # CTC: per-frame logits (32 symbols) with alpha_out 1
    assert tedlium["length_assumed"] and tedlium["bytes_per_worker_step"] == 8 * 500 * (24 * 1024 + 32) * 2
    slurp = rows["wav2vec2-large-slurp-bimamba2"]  # 10 s clips at 50 frames/s
    assert not slurp["length_assumed"] and slurp["positions_per_worker_step"] == 8 * 500
