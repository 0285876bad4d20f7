"""lorasup as the per-job entrypoint of a cluster scheduler (SLURM), never a scheduler itself."""
