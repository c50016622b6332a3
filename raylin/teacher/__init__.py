"""Teachers for distillation: in-process now, Ray-actor service later (same interface)."""
