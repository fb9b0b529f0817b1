"""The stages of a run: init, distill, dpo, eval, export (each `run(config, workdir)`)."""
