"""The ahead-of-time planner: per-device memory of the real KD and DPO steps for an accelerator
topology, without weights and without the accelerator (`python -m xecomla.tools.plan`).

  shapes.py    the abstract teacher and student: config.json of a model directory, or a named
               Llama shape matched from the directory name; the student's MLAConfig
  topology.py  topology names (v5e:4x4, v5p:2x2x1, h100:8, ...), chips, HBM, TPU devices (libtpu)
  analytic.py  a per-device memory breakdown from shapes alone (every platform)
  compile.py   the KD and DPO trainers built as the stages build them, compiled for a topology;
               the compiler's memory_analysis
  search.py    candidate meshes and micro-batches that fit, ranked analytically, confirmed by the
               compiler
  plan.py      the whole plan as a JSON-ready dict
  report.py    its text report

Nothing here imports libtpu at import time: TPU devices come from
`jax.experimental.topologies` only when a TPU topology is planned.
"""
