"""The student a run starts from: the XATL conversion of its conversion source.

``config.conversion_source`` is the target teacher for target and hybrid guidance (the student
starts where the teacher it distils from ended) and the pretrained model otherwise. Every training
worker builds the same student from it; an align task (raylin.train.align) builds only the blocks
it aligns (``block_local_student``), each block exactly as in the whole student.

Under ZeRO-3 no worker holds the whole model (``sharded_student``): the student's structure is
built inside DeepSpeed's ``zero.Init``, which partitions every parameter over the workers as its
module is built, and is then filled one teacher block at a time from block-local conversions, so a
worker's peak is its partition plus one block's conversion (with the embeddings and head), and the
student and its transfer report equal the whole conversion's.
"""

from __future__ import annotations

import copy
import importlib
import logging

import torch
from transformers.initialization import no_init_weights
from transformers.integrations.deepspeed import prevent_arange_dtype_change

from raylin.config import RunConfig
from raylin.convert import TensorRecord, TransferReport, convert
from raylin.task_model import load_task_model
from raylin.models.families import BlockSubset, family_for_config
from raylin.models.student import RaylinStudent

log = logging.getLogger(__name__)


def converted_student(config: RunConfig):
    """(student, transfer report, tokenizer or feature extractor), converted from the run's
    conversion source with its task head. Deterministic: the same on every rank and every call."""
    torch.manual_seed(config.train.seed)  # a new task head and new mixers start the same on every rank
    init_model, processor = load_task_model(config, config.conversion_source)
    student, report = convert(init_model, config.plan, processor)
    return student, report, processor


def block_local_student(config: RunConfig, layer_ids: list[int]):
    """(student, transfer report, processor) holding only teacher blocks ``layer_ids`` (plus what
    comes before and after the blocks: embeddings, final norm, head), converted from the teacher's
    weights of those blocks alone: memory follows the blocks held, not the model. Its block for
    teacher block i (``student.block(i)``) equals the whole student's block i, tensor for tensor."""
    teacher_config = config.teacher_config()
    family_for_config(teacher_config)  # an unsupported architecture is named before any weight loads
    blocks = BlockSubset.of(teacher_config, layer_ids)
    torch.manual_seed(config.train.seed)
    init_model, processor = load_task_model(config, config.conversion_source, blocks=blocks)
    student, report = convert(init_model, config.plan, processor, blocks=blocks)
    return student, report, processor


def held_blocks(student: RaylinStudent) -> BlockSubset:
    """The teacher blocks a (possibly block-local) student holds: its block j is teacher block
    ``student.layer_ids[j]``; ``whole_key`` names its tensors as in the whole student."""
    return BlockSubset.of(student.config.build_teacher_config(), student.layer_ids)


def named_as_whole(student: RaylinStudent, blocks_only: bool = False) -> dict[str, torch.Tensor]:
    """A block-local student's tensors (its state dict) under their names in the whole student:
    its block j is teacher block ``student.layer_ids[j]``. ``blocks_only``: leave out what lies
    outside the blocks (embeddings, final norm, head)."""
    subset = held_blocks(student)
    named = {}
    for key, tensor in student.state_dict().items():
        whole, in_block = subset.whole_key(key)
        if in_block or not blocks_only:
            named[whole] = tensor
    return named


@torch.no_grad()
def assign_tensors(student: torch.nn.Module, state: dict[str, torch.Tensor]) -> set[str]:
    """Copy ``state`` (names as in ``student.state_dict()``) into ``student``, parameters and
    buffers, also when ZeRO-3 partitions its parameters: each is gathered, written on every rank
    and partitioned again, one at a time. Returns the names written; a name the student lacks is
    a ValueError."""
    params = dict(student.named_parameters(remove_duplicate=False))
    buffers = dict(student.named_buffers())
    unknown = sorted(set(state) - set(params) - set(buffers))
    if unknown:
        raise ValueError(f"tensors {unknown[:3]} are not in this student.")
    partitioned = any(hasattr(p, "ds_id") for p in params.values())
    deepspeed = importlib.import_module("deepspeed") if partitioned else None  # in workers only: see raylin.train.checkpoint
    for name, tensor in state.items():
        if name in buffers:
            buffers[name].copy_(tensor)
        elif partitioned:
            with deepspeed.zero.GatheredParameters([params[name]], modifier_rank=0):
                params[name].copy_(tensor)
        else:
            params[name].copy_(tensor)
    return set(state)


def sharded_student(config: RunConfig, deepspeed_config: dict):
    """``converted_student`` for ZeRO-3 without the whole model on any worker: the structure is built
    inside ``deepspeed.zero.Init`` (partitioned as each module is built, no weight initialised), then
    filled with one block-local conversion (``block_local_student``) per teacher block, the first
    also giving what lies outside the blocks. The student gathered from its partitions equals
    ``converted_student``'s tensor for tensor, and the report holds the same records.

    Limit: with ``linformer.share: layer`` the one student-wide projection is drawn after the whole
    model's other weights, which a block-local conversion does not reproduce, so that plan is built
    whole (``converted_student``) and partitioned by DeepSpeed afterwards."""
    if config.plan.shares_across_layers:
        log.info("linformer.share: layer: the student is built whole, then partitioned by ZeRO-3")
        return converted_student(config)
    deepspeed = importlib.import_module("deepspeed")  # in workers only: see raylin.train.checkpoint
    teacher_config = config.teacher_config()
    num_layers = family_for_config(teacher_config).num_layers(teacher_config)
    # 1. The first block's conversion, whose config is the whole student's but for its blocks.
    local, local_report, processor = block_local_student(config, [0])
    whole_config = copy.deepcopy(local.config)
    whole_config.layer_ids = None
    # 2. The whole structure, partitioned as it is built (transformers' own ZeRO-3 construction),
    #    over the process group Ray Train set up (deepspeed.comm adopts it).
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), verbose=False)
    with no_init_weights(), prevent_arange_dtype_change(), deepspeed.zero.Init(config_dict_or_path=deepspeed_config):
        student = RaylinStudent(whole_config)
    student.model.tie_weights()  # no_init_weights skips the tying too (tied embeddings and head stay one parameter)
    # 3. Every block's tensors from its own conversion; the first also fills embeddings, norms and head.
    filled: set[str] = set()
    records: list[TensorRecord] = []
    for layer_idx in range(num_layers):
        if layer_idx > 0:
            local, local_report, _ = block_local_student(config, [layer_idx])
        filled |= assign_tensors(student, named_as_whole(local, blocks_only=layer_idx > 0))
        records += _whole_records(local, local_report, blocks_only=layer_idx > 0)
        del local
    unfilled = sorted(set(student.state_dict()) - filled)
    if unfilled:
        raise RuntimeError(f"sharded construction left {unfilled[:3]} unset; report this as a raylin bug.")
    report = TransferReport(local_report.teacher_class, local_report.family, local_report.plan)
    order = {name: i for i, name in enumerate(student.state_dict())}
    kept = sorted((r for r in records if r.status != "skipped"), key=lambda r: order[r.name])
    report.records = kept + [r for r in records if r.status == "skipped"]
    student.processor = processor
    return student.eval(), report, processor


def _whole_records(student: RaylinStudent, report: TransferReport, blocks_only: bool) -> list[TensorRecord]:
    """A block-local conversion's report records under the whole student's (or teacher's) names."""
    subset = held_blocks(student)
    records = []
    for record in report.records:
        name, in_block = subset.whole_key(record.name)
        if in_block or not blocks_only:
            records.append(TensorRecord(name, record.status, record.shape, record.numel, record.note))
    return records

