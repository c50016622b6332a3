"""The teacher service: served == in-process, restarts, the trajectory teacher, the cache, alignment."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import transformers

from conftest import losses_of, run_config
from raylin.distill.losses import kd_loss, layerwise_loss
from raylin.models.teachers import load_teacher
from raylin.teacher import TeacherRequest, teacher_spec
from raylin.teacher.bank import TeacherBank, TeacherOutput, pack, unpack
from raylin.teacher.activation_cache import ActivationCache

pytestmark = pytest.mark.assets


def _load(spec):
    return lambda path: load_teacher(path, model_class=spec.model_class, num_labels=spec.num_labels)[0]


def _request(teachers, step=0, ids=(0, 1, 2), teacher="target"):
    tokenizer = transformers.AutoTokenizer.from_pretrained(teachers["target"])
    texts = ["a fine film", "dull, slow and far too long for what it says", "yes"]
    batch = tokenizer([texts[i % 3] for i in ids], padding=True, return_tensors="np")
    return TeacherRequest(step, teacher, {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")},
                          labels=np.array([i % 2 for i in ids]), example_ids=list(ids))


def _spec(teachers, tmp_path, **changes):
    config = run_config(teachers, tmp_path / "run", **{"teacher_service.cache": True,
                                                       "teacher_service.cache_dir": str(tmp_path / "cache")})
    return dataclasses.replace(teacher_spec(config), **changes)


def test_compact_outputs_cross_the_wire_unchanged():
    output = TeacherOutput([torch.randn(2, 3, 4).bfloat16(), None, torch.randn(2, 3, 4).bfloat16()], torch.randn(2, 5).bfloat16())
    back = unpack(pack(output, "bfloat16"))
    assert back.hidden_states[1] is None
    assert torch.equal(back.hidden_states[0], output.hidden_states[0]) and torch.equal(back.logits, output.logits)


def test_cache_hits_do_not_call_the_teacher_and_changed_keys_miss(teachers, tmp_path):
    spec = _spec(teachers, tmp_path)
    bank = TeacherBank(spec, _load(spec), torch.device("cpu"))
    first = bank.compute(_request(teachers))
    assert bank.forwards == 1 and bank.cache.stats()["cache_misses"] == 3
    again = bank.compute(_request(teachers))
    assert bank.forwards == 1 and bank.cache.stats()["cache_hits"] == 3
    for fresh, cached in zip(first.hidden_states, again.hidden_states):
        mask = torch.as_tensor(_request(teachers).inputs["attention_mask"]).bool()
        assert torch.equal(fresh[mask], cached[mask])  # real positions identical; padding is never read
    assert torch.equal(first.logits, again.logits)
    # Another batch composition of cached examples: still no teacher call.
    bank.compute(_request(teachers, ids=(2, 0)))
    assert bank.forwards == 1
    # A changed dtype, layer selection, data set or teacher checkpoint never reads these entries.
    for changes in ({"dtype": "float16"}, {"layers": (0, 2)}, {"data_key": "imdb"}):
        other = TeacherBank(dataclasses.replace(spec, **changes), _load(spec), torch.device("cpu"))
        other.compute(_request(teachers))
        assert other.forwards == 1, changes
    weights = os.path.join(teachers["target"], "model.safetensors")
    os.utime(weights, ns=(os.stat(weights).st_atime_ns, os.stat(weights).st_mtime_ns + 1_000_000))
    retrained = TeacherBank(spec, _load(spec), torch.device("cpu"))
    retrained.compute(_request(teachers))
    assert retrained.forwards == 1


def test_the_cache_key_covers_every_data_setting_but_the_held_out_cap(teachers, tmp_path):
    """Two runs on one teacher share cached activations only when their training examples are the
    same: data.source (two hub_audio corpora) and every other data setting change the key."""
    config = run_config(teachers, tmp_path)
    key = teacher_spec(config).data_key

    def with_data(**changes):
        return teacher_spec(dataclasses.replace(config, data=dataclasses.replace(config.data, **changes))).data_key

    assert with_data(source={"path": "corpus-a"}) != with_data(source={"path": "corpus-b"}) != key
    for changes in ({"max_length": 40}, {"seed": 1}, {"max_train_examples": 10}, {"eval_fraction": 0.2}):
        assert with_data(**changes) != key, changes
    assert with_data(max_eval_examples=3) == key  # held-out examples are never cached


def test_cached_speech_states_do_not_depend_on_the_batch_that_first_computed_them(teachers, tmp_path):
    """Wav2Vec2's group-norm feature encoder normalises over padding, so a short clip's states differ
    between batches; cached entries are each clip's own states, computed alone and unpadded."""
    config = transformers.Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                         conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), feat_extract_norm="group",
                                         num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, num_labels=2)
    torch.manual_seed(0)
    model = transformers.Wav2Vec2ForSequenceClassification(config).eval()
    lengths = torch.tensor([1600, 4000])
    mask = (torch.arange(4000)[None, :] < lengths[:, None]).long()
    values = torch.randn(2, 4000) * mask

    def request(rows):
        return TeacherRequest(0, "target", {"input_values": values[rows].numpy(), "attention_mask": mask[rows].numpy()},
                              labels=np.zeros(len(rows), dtype=np.int64), example_ids=list(rows))

    with_long = TeacherBank(_spec(teachers, tmp_path / "a", layers=None), lambda path: model, torch.device("cpu"))
    first = with_long.compute(request([0, 1]))
    assert with_long.forwards == 2  # one unpadded forward per clip
    on_its_own = TeacherBank(_spec(teachers, tmp_path / "b", layers=None), lambda path: model, torch.device("cpu"))
    alone = on_its_own.compute(request([0]))
    frames = int(first.hidden_states[-1][0].abs().sum(-1).gt(0).sum())
    with torch.no_grad():
        padded = model(input_values=values, attention_mask=mask, output_hidden_states=True).hidden_states
        own = model(input_values=values[:1, :1600], output_hidden_states=True).hidden_states
    assert own[-1].shape[1] == frames  # the short clip's real frames
    for a, b, mine in zip(first.hidden_states, alone.hidden_states, own):
        assert torch.equal(a[0, :frames], b[0, :frames])
        assert torch.equal(a[0, :frames], mine[0].bfloat16())
    assert not torch.allclose(padded[-1][0, :frames], own[-1][0], atol=1e-3)  # padding does change them
    assert torch.equal(first.logits[0], alone.logits[0])


def test_cache_stays_within_its_budget_evicting_least_recently_used(tmp_path):
    cache = ActivationCache(tmp_path, max_bytes=3 * 1200)
    entry = {"h0": torch.zeros(10, 32, dtype=torch.bfloat16)}  # ~ 750 bytes on disk
    for example in range(4):
        cache.put("ns", example, entry)
    cache.get("ns", 0)  # 0 becomes the most recently used
    for example in range(4, 7):
        cache.put("ns", example, entry)
    assert cache.total_bytes <= cache.max_bytes and cache.stats()["cache_evictions"] > 0
    assert cache.get("ns", 1) is None and cache.get("ns", 6) is not None
    assert cache.total_bytes == sum(f.stat().st_size for f in tmp_path.glob("*/*.safetensors"))


def test_trajectory_teacher_steps_every_tu_steps_on_the_global_batch(teachers, tmp_path):
    spec = _spec(teachers, tmp_path, target=None, source=teachers["source"], trajectory_every=2, trajectory_lr=1e-2,
                 cache_dir=None)
    bank = TeacherBank(spec, _load(spec), torch.device("cpu"))
    model = bank._models["trajectory"]
    reference = _load(spec)(teachers["source"]).train()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    # Steps 0 and 1, two workers' micro-batches each (update at the end of step 1: T_u = 2).
    requests = [_request(teachers, step=s, ids=ids, teacher="trajectory") for s in (0, 1) for ids in ((0, 1), (2, 0))]
    for request in requests:
        request.micro_batches, request.update_teacher = 2, request.step == 1
    for n, request in enumerate(requests):
        bank.compute(request)
        changed = any(not torch.equal(v, start[k]) for k, v in model.state_dict().items())
        assert changed == (n == 3), f"teacher changed after micro-batch {n}"
    assert bank.updated_through == 1
    # The update equals one AdamW step on the mean task loss of the four micro-batches.
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    for request in requests:
        inputs = {k: torch.as_tensor(v) for k, v in request.inputs.items()}
        logits = reference(**inputs).logits
        (torch.nn.functional.cross_entropy(logits, torch.as_tensor(request.labels)) / 4).backward()
    optimizer.step()
    for (name, got), want in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


# ----- on a local Ray cluster ----------------------------------------------------------------------


def test_served_and_in_process_teachers_give_identical_losses_and_gradients(teachers, ray_cluster, tmp_path):
    import ray

    from raylin.teacher import teacher_pool

    torch.set_num_threads(1)  # the replica runs on one thread, as a one-CPU worker does
    config = run_config(teachers, tmp_path / "run")
    spec = teacher_spec(config)
    pool = teacher_pool(config, spec)
    try:
        served = unpack(ray.get(pool.replica().serve.remote(_request(teachers))))
    finally:
        pool.shutdown()
    local = TeacherBank(spec, _load(spec), torch.device("cpu")).compute(_request(teachers))
    student = transformers.AutoModelForSequenceClassification.from_pretrained(teachers["source"])
    inputs = {k: torch.as_tensor(v) for k, v in _request(teachers).inputs.items()}
    grads = []
    for teacher in (served, local):
        student.zero_grad()
        out = student(**inputs, output_hidden_states=True)
        loss = layerwise_loss(out.hidden_states, teacher.hidden_states, mask=inputs["attention_mask"]) + kd_loss(out.logits, teacher.logits, 2.0)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in student.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1]))


def test_served_run_matches_in_process_and_survives_a_killed_teacher(teachers, ray_cluster, tmp_path, monkeypatch):
    from raylin.train.trainer import TEACHER_STATS, fit

    local = fit(run_config(teachers, tmp_path / "local", **{"teacher_service.mode": "inprocess"}))
    monkeypatch.setenv("RAYLIN_TEST_FAULT", "teacher-crash:5")
    served = fit(run_config(teachers, tmp_path / "served"))
    assert (tmp_path / "served" / ".fault-teacher-crash-5").exists()  # the replica really died at step 5
    assert served.error is None and local.error is None
    assert losses_of(tmp_path / "served") == losses_of(tmp_path / "local")
    assert served.metrics["eval_accuracy"] == local.metrics["eval_accuracy"]
    stats = json.loads((tmp_path / "served" / TEACHER_STATS).read_text())
    assert stats["transfer_bytes"] > 0


def test_served_trajectory_teacher_matches_in_process(teachers, ray_cluster, tmp_path):
    from raylin.train.trainer import fit

    guidance = {"mode": "trajectory", "teacher_update_every": 2, "teacher_lr": 1e-3}
    fit(run_config(teachers, tmp_path / "local", guidance=guidance, **{"teacher_service.mode": "inprocess"}))
    fit(run_config(teachers, tmp_path / "served", guidance=guidance))
    # In-process workers average their gradients; the replica sums micro-batches: same maths, other order.
    torch.testing.assert_close(torch.tensor(losses_of(tmp_path / "served")), torch.tensor(losses_of(tmp_path / "local")),
                               rtol=1e-5, atol=1e-6)


def test_alignment_lowers_every_layer_mse_across_two_workers(teachers, ray_cluster, tmp_path):
    from raylin.train.align import load_aligned, run_align
    from raylin.train.student_build import converted_student

    config = run_config(teachers, tmp_path / "aligned", align={"enabled": True, "steps": 20, "num_workers": 2},
                        **{"teacher_service.cache": True, "teacher_service.cache_dir": str(tmp_path / "cache")})
    summary = run_align(config)
    assert summary["workers"] == 2 and len(summary["worker_pids"]) == 2
    assert set(summary["layers"]) == {"0", "1"}
    for layer, mse in summary["layers"].items():
        assert mse["mse_after"] < 0.8 * mse["mse_before"], (layer, mse)
    # Both workers read every batch; the shared cache answered the second read of each.
    assert summary["teacher"]["cache_hits"] > 0
    assert summary["teacher"]["teacher_forwards"] < 2 * (config.align.steps + 1)
    student, _, _ = converted_student(config)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    load_aligned(student, config)
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(".E." in k or ".F." in k for k in changed)  # only the new Linformer projections learned
    assert run_align(config) == summary  # a finished stage is reused
    # `raylin convert` runs align -> distill; the distill workers start from the aligned blocks.
    from raylin.pipeline import run_conversion

    metrics = run_conversion(config)
    assert metrics["align"]["layers"] == summary["layers"] and metrics["steps"] == 12
    # Scored on the Rotten Tomatoes default's out-of-distribution set too, with its retention.
    imdb = metrics["retention"]["imdb"]
    assert set(metrics["retention"]) == {"held_out", "imdb"} and imdb["retention"] == imdb["student"] / imdb["teacher"]
    assert "| imdb | accuracy |" in (tmp_path / "aligned" / "report.md").read_text()


def test_runs_that_align_to_the_same_model_share_one_alignment_through_align_dir(teachers, ray_cluster, tmp_path):
    from raylin.train.align import aligned_dir, load_aligned, run_align
    from raylin.train.student_build import converted_student

    align = {"enabled": True, "steps": 3, "num_workers": 2, "dir": str(tmp_path / "store")}
    first = run_config(teachers, tmp_path / "target", align=align)
    # hybrid guidance also starts from the target teacher; other distillation settings do not matter
    same = run_config(teachers, tmp_path / "hybrid", align=align, guidance={"mode": "hybrid", "hybrid_cutoff": 6},
                      **{"loss.alpha_out": 0.0})
    from_source = run_config(teachers, tmp_path / "unguided", align=align, guidance={"mode": "unguided"})
    longer = run_config(teachers, tmp_path / "longer", align={**align, "steps": 4})
    assert aligned_dir(first) == aligned_dir(same) and aligned_dir(first).parent == tmp_path / "store"
    assert len({aligned_dir(c) for c in (first, from_source, longer)}) == 3
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as threads:  # started together: one computes, the other waits and reuses it
        summary, again = threads.map(run_align, [first, same])
    assert again == summary  # same worker pids and wall time: computed once
    assert run_align(same) == summary
    name = aligned_dir(first).name
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == [f".{name}.lock", name]  # no staging left
    student, _, _ = converted_student(same)
    load_aligned(student, same)
    with pytest.raises(FileNotFoundError, match="align.enabled is set but .* does not exist"):
        load_aligned(student, from_source)


def test_a_served_run_that_cannot_fit_the_cluster_fails_before_training(teachers, ray_cluster, tmp_path):
    from raylin.train.trainer import fit

    config = run_config(teachers, tmp_path / "too-big", **{"train.cpus_per_worker": 1.0})
    with pytest.raises(RuntimeError, match=r"needs 3 CPUs .*teacher_service.cpus=1\).*cluster has 2"):
        fit(config)
    from raylin.train.trainer import check_resources

    on_gpus = run_config(teachers, tmp_path / "gpus", **{"train.use_gpu": True, "train.gpus_per_worker": 0.75})
    with pytest.raises(RuntimeError, match=r"needs 1.5 GPUs \(2 workers x train.gpus_per_worker=0.75\).*cluster has 0"):
        check_resources(on_gpus, with_teacher_replica=False, use_gpu=True)


def test_trajectory_replica_made_by_a_worker_escapes_the_workers_placement_group(teachers, ray_cluster, tmp_path):
    """Ray Train workers (and Tune trials) run in placement groups that capture child actors; the
    single trajectory replica a worker creates must not be squeezed into the worker's bundle."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from raylin.teacher import teacher_pool, teacher_spec

    config = run_config(teachers, tmp_path, **{"guidance.mode": "trajectory"})
    pool = teacher_pool(config, teacher_spec(config))
    group = placement_group([{"CPU": 0.5}])
    ray.get(group.ready(), timeout=60)

    @ray.remote(num_cpus=0.5)
    def like_a_train_worker(pool) -> str:
        return ray.get(pool.replica().ping.remote())

    strategy = PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)
    try:
        assert ray.get(like_a_train_worker.options(scheduling_strategy=strategy).remote(pool), timeout=120)
    finally:
        pool.shutdown()
        remove_placement_group(group)
