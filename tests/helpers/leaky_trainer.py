"""A trainer that leaks its credentials into its own output, the way real scripts do.

``leaky_trainer.py STEPS [--hf_token X] ...``: prints, as error lines lorasup records as
problems, the token it was given (alone, as a short ``hf_`` token and as a ``NAME=value``
pair after an earlier ``word: ``), then ``Step k/STEPS | loss: ...`` lines.
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    steps = int(sys.argv[1])
    token = sys.argv[sys.argv.index("--hf_token") + 1] if "--hf_token" in sys.argv else ""
    print(f"RuntimeError: login with {token} failed, retrying", flush=True)
    print("ValueError: bad token hf_abc123XYZ in the old config", flush=True)
    print(f"Error: env: WANDB_API_KEY={os.environ.get('WANDB_API_KEY', '')} rejected",
          flush=True)
    print(f"OSError: could not reach the hub as {os.environ.get('HF_TOKEN', '')}", flush=True)
    for step in range(1, steps + 1):
        print(f"Step {step}/{steps} | loss: {1 / step:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
