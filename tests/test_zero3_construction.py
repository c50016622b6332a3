"""Sharded construction under ZeRO-3 (issue 22): two real gloo processes build the student inside
DeepSpeed's zero.Init and fill it block by block; gathered from its partitions it equals the
whole conversion tensor for tensor, its transfer report holds the same records, and each process
holds only its partition of the parameters."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp
import transformers
from conftest import make_teacher, run_config

from raylin.config import config_from_dict
from raylin.train.deepspeed import deepspeed_config
from raylin.train.student_build import converted_student, sharded_student

pytestmark = pytest.mark.assets

MAMBA2 = {"mixer": "mamba2", "init": "attention", "keep_attention": [1], "mamba2": {"head_dim": 8, "state_size": 8}}


def _build_sharded(rank: int, world: int, config_dict: dict, port: int, out: str) -> None:
    """One process of the world: build the sharded student, gather it, and (rank 0) save what it holds."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import deepspeed  # noqa: F401 -- in the spawned process only, as in a training worker

    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    config = config_from_dict(config_dict)
    student, report, _ = sharded_student(config, deepspeed_config(config.train, world, torch.device("cpu")))
    held = sum(p.ds_tensor.numel() for p in student.parameters())
    whole = sum(p.ds_numel for p in student.parameters())
    with deepspeed.zero.GatheredParameters(list(student.parameters())):
        state = {name: tensor.detach().clone() for name, tensor in student.state_dict().items()}
    if rank == 0:
        torch.save(state, f"{out}/state.pt")
        with open(f"{out}/report.json", "w") as f:
            json.dump({"report": report.to_dict(), "held": held, "whole": whole, "shared": _shared_names(student)}, f)
    torch.distributed.destroy_process_group()


def _shared_names(student) -> list[str]:
    """Names of parameters that are another name's parameter (tied weights)."""
    first = {}
    for name, param in student.named_parameters(remove_duplicate=False):
        first.setdefault(id(param), name)
    return sorted(name for name, param in student.named_parameters(remove_duplicate=False) if first[id(param)] != name)


def _spawn(config, tmp_path, port):
    mp.spawn(_build_sharded, args=(2, config.to_dict(), port, str(tmp_path)), nprocs=2, join=True)
    result = json.loads((tmp_path / "report.json").read_text())
    return torch.load(tmp_path / "state.pt", weights_only=True), result


def _assert_same_as_whole(config, tmp_path, port):
    state, result = _spawn(config, tmp_path, port)
    student, report, _ = converted_student(config)
    expected = student.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[name], expected[name]) for name in expected), \
        [name for name in expected if not torch.equal(state[name], expected[name])][:3]
    got = result["report"]
    assert got["summary"] == report.summary()
    # The same records; the student's in the same order (teacher tensors it skips may come in another).
    assert sorted(map(json.dumps, got["tensors"])) == sorted(map(json.dumps, report.to_dict()["tensors"]))
    kept = [r for r in report.to_dict()["tensors"] if r["status"] != "skipped"]
    assert [r for r in got["tensors"] if r["status"] != "skipped"] == kept
    assert result["shared"] == _shared_names(student)  # tied weights stay one parameter
    # Rank 0 holds its partition: half of the parameters, padded to the world size per tensor.
    assert result["whole"] == sum(p.numel() for p in student.parameters())
    assert result["whole"] / 2 <= result["held"] <= result["whole"] / 2 + len(expected)
    return result


def test_sharded_llama_hybrid_with_tied_embeddings_equals_the_whole_conversion(tmp_path):
    config = make_teacher("llama").config
    config.tie_word_embeddings = True  # as SmolLM2's: the head is the embedding, one parameter
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "teacher")
    config = config_from_dict({
        "teacher": str(tmp_path / "teacher"), "output_dir": str(tmp_path / "out"), "task": {"type": "causal_lm"},
        "data": {"name": "austen", "max_length": 32}, "plan": MAMBA2, "guidance": {"mode": "unguided"},
        "train": {"num_workers": 2, "zero_stage": 3, "batch_size": 2, "precision": "fp32"}})  # as the whole conversion
    (tmp_path / "built").mkdir()
    result = _assert_same_as_whole(config, tmp_path / "built", 29611)
    assert result["shared"] == ["model.lm_head.weight"]


def test_sharded_classifier_with_a_new_head_equals_the_whole_conversion(teachers, tmp_path):
    # A BERT classifier whose task head the conversion keeps, and a Linformer student.
    config = run_config(teachers, tmp_path / "out", **{"train.zero_stage": 3})
    (tmp_path / "built").mkdir()
    _assert_same_as_whole(config, tmp_path / "built", 29612)
