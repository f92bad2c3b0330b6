"""Run under torchrun by tests/test_distributed.py: several `sparsegrad finetune` command lines in one process group
launch (each call joins and leaves the process group itself, as `torchrun -m sparsegrad finetune` does)."""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from sparsegrad.finetune.cli import main  # noqa: E402


def run() -> int:
    codes = {}
    for name, argv in json.loads(sys.argv[1]).items():
        codes[name] = main(argv)
    if os.environ.get("RANK") == "0":
        print("EXIT CODES", json.dumps(codes), flush=True)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # leave the group in step, not from gloo threads at exit
        dist.barrier()
        dist.destroy_process_group()
    return max(codes.values(), default=0)


if __name__ == "__main__":
    raise SystemExit(run())
