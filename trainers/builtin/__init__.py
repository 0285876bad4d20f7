"""lorasup's embedded default trainer: a small, real LoRA trainer in numpy (run with -m)."""
