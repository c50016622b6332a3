"""The benchmark harnesses behind ``raylin bench``, one module per command:

    speed.py       ``raylin bench speed``: latency / memory against length; the shipped models
    throughput.py  ``raylin bench distill``: the distillation step against a plain loop; bf16 scores
    quality.py     ``raylin bench quality``: teacher vs students on text, LM and speech
    cluster.py     ``raylin bench cluster``: teacher traffic per node on simulated nodes
    scale.py       ``raylin bench scale``: align-task peaks, ZeRO memory, a 1.1B conversion
    recovery.py    ``raylin bench faults``: the fault soak (faults injected by raylin.faults)

What they measure with lives outside this package, where the runs use it too: scores and retention
in raylin.scoring, timings in raylin.timing, figures in raylin.plots. Nothing outside this package
imports it (the tests and the command line aside).
"""
