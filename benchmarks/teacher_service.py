"""Teacher service benchmark: tokens per second of a distill step with the teacher
(a) in-process, sharing the student's core; (b) served from its own core with prefetch;
(c) served from the activation cache. Also bytes per step through the object store and the time
spent moving them, for a teacher as wide as the student and one 4x wider.

    python benchmarks/teacher_service.py [--steps 12] [--batch 16] [--length 64] [--out docs/benchmarks]

The student is all-MiniLM-L6 converted to Linformer (k=32), trained with a plain AdamW in a Ray
actor holding one CPU; the teacher gets one CPU of its own when served. The 1x teacher is
all-MiniLM-L6 itself (layerwise + KD loss); the 4x teacher is a BERT of the same depth at 4x the
width with random weights (KD loss only: widths differ). Data: Rotten Tomatoes reviews. Writes
teacher-service-cpu.json and .png. Needs 2 CPUs; starts and stops its own local Ray.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

STUDENT_PLAN = {"mixer": "linformer", "linformer": {"k": 32, "share": "kv"}}


class StudentWorker:
    """One training worker: converts its student, then times distill steps against a teacher."""

    def __init__(self, teacher: str, alpha_layer: float, batch: int, length: int):
        from raylin.convert import convert
        from raylin.data.batch_order import GlobalBatches
        from raylin.data.text import load_text_classification
        from raylin.models.teachers import load_teacher

        torch.set_num_threads(1)
        torch.manual_seed(0)
        model, self.tokenizer = load_teacher("asset:all-minilm-l6", model_class="AutoModelForSequenceClassification", num_labels=2)
        self.student, _ = convert(model, STUDENT_PLAN, self.tokenizer)
        self.data = load_text_classification("rotten_tomatoes", 0.1, 0, None, None)
        self.batches = GlobalBatches(len(self.data.train_texts), batch, 0)
        self.teacher, self.alpha_layer, self.length = teacher, alpha_layer, length

    def _batch(self, step: int):
        from raylin.data.text import tokenize

        ids = self.batches.indices(step)
        batch = dict(tokenize(self.tokenizer, [self.data.train_texts[i] for i in ids], self.length))
        batch["labels"] = torch.tensor([self.data.train_labels[i] for i in ids])
        return ids, batch

    def run(self, mode: str, spec, pool, steps: int, warmup: int = 2) -> dict:
        import ray

        from raylin.distill.losses import classification_loss, kd_loss, layerwise_loss
        from raylin.models.teachers import load_teacher
        from raylin.teacher import TeacherRequest
        from raylin.teacher.bank import TeacherBank, unpack

        optimizer = torch.optim.AdamW(self.student.parameters(), lr=1e-4)
        bank = replica = None
        if mode == "inprocess":
            bank = TeacherBank(spec, lambda p: load_teacher(p, model_class=spec.model_class, num_labels=2)[0], torch.device("cpu"))
        else:
            replica = pool.replica()
            ray.get(replica.ping.remote())

        def request(step):
            ids, batch = self._batch(step)
            inputs = {k: v.numpy() for k, v in batch.items() if k != "labels"}
            message = TeacherRequest(step, "target", inputs, example_ids=ids)
            return ids, batch, (bank.compute(message) if bank else replica.serve.remote(message))

        timings, pending = [], None
        for step in range(steps + warmup):
            started = time.perf_counter()
            ids, batch, teacher = pending or request(step)
            pending = request(step + 1) if replica is not None else None  # prefetch: the teacher works on s+1 now
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            out = self.student(**inputs, output_hidden_states=self.alpha_layer > 0)
            transfer = wait = 0.0
            nbytes = 0
            if replica is not None:
                ready, _ = ray.wait([teacher], timeout=0)
                got = time.perf_counter()
                message = ray.get(teacher)
                spent = time.perf_counter() - got
                transfer, wait = (spent, 0.0) if ready else (0.0, spent)
                nbytes = sum(a.nbytes for a in (message["hidden"], message["logits"]) if a is not None)
                got = time.perf_counter()
                teacher = unpack(message)
                transfer += time.perf_counter() - got
            loss = classification_loss(out.logits, batch["labels"]) + kd_loss(out.logits, teacher.logits, 2.0)
            if self.alpha_layer > 0:
                loss = loss + self.alpha_layer * layerwise_loss(out.hidden_states, teacher.hidden_states, mask=batch["attention_mask"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step >= warmup:
                timings.append({"step_s": time.perf_counter() - started, "transfer_s": transfer, "wait_s": wait,
                                "bytes": nbytes, "tokens": int(batch["attention_mask"].sum())})
        if pending is not None:
            ray.get(pending[2])
        total = sum(t["step_s"] for t in timings)
        return {
            "mode": mode, "steps": len(timings), "tokens_per_s": sum(t["tokens"] for t in timings) / total,
            "step_s": total / len(timings), "transfer_s_per_step": sum(t["transfer_s"] for t in timings) / len(timings),
            "wait_s_per_step": sum(t["wait_s"] for t in timings) / len(timings),
            "bytes_per_step": sum(t["bytes"] for t in timings) / len(timings),
            "transfer_fraction": sum(t["transfer_s"] for t in timings) / total,
        }


def wide_teacher(folder: Path, width_factor: int) -> str:
    import transformers

    from raylin.assets import asset_path

    base = transformers.AutoConfig.from_pretrained(asset_path("all-minilm-l6"))
    config = transformers.BertConfig(
        vocab_size=base.vocab_size, hidden_size=base.hidden_size * width_factor, num_hidden_layers=base.num_hidden_layers,
        num_attention_heads=base.num_attention_heads, intermediate_size=base.intermediate_size * width_factor,
        max_position_embeddings=base.max_position_embeddings, num_labels=2,
    )
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(asset_path("all-minilm-l6")).save_pretrained(folder)
    return str(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--out", default="docs/benchmarks")
    args = parser.parse_args()

    import ray

    from raylin.assets import asset_path
    from raylin.teacher.bank import TeacherSpec
    from raylin.teacher.pool import TeacherPool

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="raylin-teacher-bench-"))
    teachers = {"1x": (str(asset_path("all-minilm-l6")), 1.0), "4x": (wide_teacher(scratch / "wide", 4), 0.0)}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    results = []
    try:
        for width, (path, alpha_layer) in teachers.items():
            worker = ray.remote(StudentWorker).options(num_cpus=1).remote(path, alpha_layer, args.batch, args.length)
            for mode in ("inprocess", "served", "cached"):
                spec = TeacherSpec(model_class="AutoModelForSequenceClassification", num_labels=2, target=path,
                                   hidden=alpha_layer > 0, logits=True, dtype="bfloat16",
                                   cache_dir=str(scratch / "cache") if mode == "cached" else None,
                                   cache_max_bytes=8 * 2**30, data_key=f"rotten_tomatoes|{args.length}")
                pool = TeacherPool(spec, cpus=1.0)
                try:
                    if mode == "cached":  # fill the cache with the benchmark's batches first
                        ray.get(worker.run.remote("served", spec, pool, args.steps))
                    before = pool.stats() if mode != "inprocess" else {}
                    row = ray.get(worker.run.remote("served" if mode == "cached" else mode, spec, pool, args.steps))
                    after = pool.stats() if mode != "inprocess" else {}
                finally:
                    pool.shutdown()
                row |= {"mode": mode, "teacher_width": width,
                        "teacher_forwards": after.get("teacher_forwards", 0) - before.get("teacher_forwards", 0)
                        if mode != "inprocess" else None}
                results.append(row)
                print(json.dumps(row), flush=True)
            ray.kill(worker)
    finally:
        ray.shutdown()
    for width in teachers:
        base = next(r for r in results if r["teacher_width"] == width and r["mode"] == "inprocess")
        for row in results:
            if row["teacher_width"] == width:
                row["speedup_vs_inprocess"] = row["tokens_per_s"] / base["tokens_per_s"]
    meta = {"machine": "2-core CPU", "batch": args.batch, "length": args.length, "steps": args.steps,
            "student": "all-MiniLM-L6 -> Linformer k=32, 1 CPU, AdamW", "teacher_cpus": 1, "dtype": "bfloat16"}
    (out / "teacher-service-cpu.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    plot(results, out / "teacher-service-cpu.png")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = sorted({r["teacher_width"] for r in results})
    modes = ["inprocess", "served", "cached"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, mode in enumerate(modes):
        values = [next(r["tokens_per_s"] for r in results if r["teacher_width"] == w and r["mode"] == mode) for w in widths]
        ax.bar([x + i * 0.27 for x in range(len(widths))], values, width=0.27, label=mode)
    ax.set_xticks([x + 0.27 for x in range(len(widths))], [f"teacher {w} width" for w in widths])
    ax.set_ylabel("student tokens / s")
    ax.set_title("Distill step throughput by teacher placement (2-core CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
