"""Ray Tune sweeps (raylin.tune.search)."""
