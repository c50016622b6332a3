"""Distributed training: DeepSpeed configuration, the per-worker loop, the Ray TorchTrainer."""
