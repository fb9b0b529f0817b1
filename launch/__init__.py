"""Launchers: local.sh (this machine), tpu.py (Cloud TPU VMs and pods), slurm.py (GPU clusters).

Each python launcher builds the exact shell commands of a job, prints them under --dry_run (a
runnable script, one command per line) and otherwise runs them, in order, with bash. Run them
from the project root: `python -m launch.tpu ...`, `python -m launch.slurm ...`.
"""
