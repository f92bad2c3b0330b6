"""torchrun / DDP: a 2-process run equals a 1-process run with the same global batch; micro-batch sharding;
broadcast_bases; the pending fixed support chosen from the all-reduced gradient."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import CLASSIFIER, losses, make_csv, max_param_diff, tiny_model_dir

from sparsegrad.finetune.cli import main
from sparsegrad.finetune.distributed import even_parts, step_micro_batches, take_rows

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_ddp_worker.py"


@pytest.fixture(scope="module")
def tiny0(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny0")
    return tiny_model_dir(CLASSIFIER, root / "model", dropout=0.0), make_csv(root / "train.csv", n=60)


def common_args(tiny0, steps=4):
    model, train = tiny0
    return ["--model", str(model), "--train-file", str(train), "--max-length", "32", "--max-steps", str(steps),
            "--density", "0.05", "--no-progress"]


def torchrun(runs: dict[str, list[str]], timeout=240) -> subprocess.CompletedProcess:
    """Every command line of ``runs`` in one 2-process torchrun launch (gloo on CPU)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
         json.dumps(runs)], capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def single(argv: list[str], capsys=None) -> None:
    code = main(argv)
    assert code == 0


# ----------------------------------------------------------------------------------------------- unit
def test_even_parts_and_micro_batches():
    assert [len(p) for p in even_parts(10, 4)] == [3, 3, 2, 2]
    assert [len(p) for p in even_parts(2, 4)] == [1, 1, 0, 0]
    ids = torch.tensor([[1, 2, 3, 0], [1, 2, 0, 0], [1, 2, 3, 4], [1, 0, 0, 0], [5, 6, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids > 0).long(), "labels": torch.arange(5)}
    # 5 rows, 2 ranks x 2 micro-batches: parts of 2, 1, 1, 1 rows; rank r takes parts r and 2 + r.
    r0 = step_micro_batches(batch, 0, 2, 2)
    r1 = step_micro_batches(batch, 1, 2, 2)
    assert [mb.batch["labels"].tolist() for mb in r0] == [[0, 1], [3]]
    assert [mb.batch["labels"].tolist() for mb in r1] == [[2], [4]]
    assert [mb.rows for mb in r0 + r1] == [2, 1, 1, 1]
    # scales: rows x world / global rows, so DDP's mean over ranks of the summed micro-batch gradients is the mean
    assert sum(mb.scale for mb in r0 + r1) / 2 == pytest.approx(1.0)
    assert r0[1].batch["input_ids"].shape == (1, 1)  # trimmed to its own longest row
    # a rank left without rows gets a stand-in row of weight 0 (it still joins the all-reduce)
    tiny = {k: v[:1] for k, v in batch.items()}
    r1 = step_micro_batches(tiny, 1, 2, 1)
    assert len(r1) == 1 and r1[0].rows == 0 and r1[0].scale == 0.0
    assert step_micro_batches(tiny, 0, 1, 3) and len(step_micro_batches(tiny, 0, 1, 3)) == 1  # empty slots dropped
    assert len(step_micro_batches(tiny, 0, 1, 3, keep_empty=True)) == 3
    assert take_rows(batch, range(0, 5)) is batch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _broadcast_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from sparsegrad.bases import SparseGradBases, broadcast_bases
    from sparsegrad.layer import _mean_over_ranks

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        bases = None
        if rank == 0:
            q = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(1)))[0]
            bases = SparseGradBases(factors={"k": (q, torch.eye(4))}, fixed_supports={"m": torch.tensor([1, 5, 7])},
                                    report={"k": {"steps": 3}})
        got = broadcast_bases(bases, src=0)
        mean = _mean_over_ranks(torch.full((2, 2), float(rank)))
        torch.save({"u_out": got.factors["k"][0], "u_in": got.factors["k"][1], "support": got.fixed_supports["m"],
                    "report": got.report, "mean": mean}, f"{out}/rank{rank}.pt")
        try:
            broadcast_bases(None, src=0)  # rank 0 has nothing: every rank raises, none hangs
        except ValueError as exc:
            Path(f"{out}/rank{rank}.err").write_text(str(exc))
    finally:
        dist.destroy_process_group()


def test_broadcast_bases_and_mean_over_ranks(tmp_path):
    torch.multiprocessing.spawn(_broadcast_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for key in ("u_out", "u_in", "support"):
        assert torch.equal(a[key], b[key])
    assert b["report"] == {"k": {"steps": 3}} and b["support"].dtype == torch.int64
    assert torch.equal(a["mean"], torch.full((2, 2), 0.5)) and torch.equal(b["mean"], a["mean"])
    for r in (0, 1):
        assert "rank 0 has no SparseGradBases" in (tmp_path / f"rank{r}.err").read_text()


# ----------------------------------------------------------------------------------------------- end to end
def test_two_processes_equal_one_process(tiny0, tmp_path):
    """2 ranks x batch 4 == 1 process x batch 8: same examples per step, gradient averaged by DDP.

    LoRA and MeProp-fixed (whose support, still pending at the first step, is chosen from the all-reduced rotated
    gradient) train to the same weights within float rounding. SparseGrad's calibrated bases are eigenvectors of
    nearly rank-2 Gram matrices on this random tiny model: their trailing columns are arbitrary up to rounding, so
    for SparseGrad the loss sequence and held-out loss are compared (and the two ranks checked bit-identical)."""
    common = common_args(tiny0)
    runs = {"sparsegrad": ["--lr", "1e-2"], "lora": ["--method", "lora"],
            "meprop-fixed": ["--method", "meprop", "--support", "fixed", "--lr", "1e-2"]}
    torchrun({name: ["finetune", *common, *extra, "--batch-size", "4", "--output-dir", str(tmp_path / "ddp" / name)]
              for name, extra in runs.items()})
    for name, extra in runs.items():
        single(["finetune", *common, *extra, "--batch-size", "8", "--output-dir", str(tmp_path / "one" / name)])
        one, ddp = tmp_path / "one" / name, tmp_path / "ddp" / name
        m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, ddp))
        assert m2["world_size"] == 2 and m2["global_batch_size"] == 8 and m2["batch_size"] == 4
        assert m2["ranks_identical"] is True and len(m2["peak_rss_mb_per_rank"]) == 2
        assert m1["world_size"] == 1 and m1["ranks_identical"] is None
        assert losses(one) == pytest.approx(losses(ddp), abs=5e-5)
        assert m1["eval_loss"] == pytest.approx(m2["eval_loss"], abs=5e-5)
        if name != "sparsegrad":
            assert max_param_diff(one, ddp) < 1e-6


@pytest.mark.slow
def test_two_processes_fixed_full_accumulation_and_resume(tiny0, tmp_path):
    """More of the same in one launch: SparseGrad fixed, full; 2 ranks x 2 micro-batches x 4 == 1 process x 16;
    a 2-process run stopped at step 2 and resumed (2 processes) equals the uninterrupted 2-process run exactly."""
    common = common_args(tiny0, steps=4)
    runs = {
        "fixed": ["--support", "fixed", "--lr", "1e-2", "--batch-size", "4"],
        "full": ["--method", "full", "--batch-size", "4"],
        "accum": ["--method", "full", "--batch-size", "4", "--grad-accum", "2"],
        "whole": ["--save-every", "2", "--lr", "1e-2", "--batch-size", "4"],
        "cut": ["--save-every", "2", "--lr", "1e-2", "--batch-size", "4", "--stop-after", "2"],
    }
    argv = {name: ["finetune", *common, *extra, "--output-dir", str(tmp_path / "ddp" / name)]
            for name, extra in runs.items()}
    argv["resume"] = ["finetune", "--resume", str(tmp_path / "ddp" / "cut"), "--no-progress"]
    torchrun(argv, timeout=400)
    whole, cut = tmp_path / "ddp" / "whole", tmp_path / "ddp" / "cut"
    assert losses(whole) == losses(cut)  # bit-exact after the resume, with 2 processes
    assert max_param_diff(whole, cut) == 0.0
    assert json.loads((cut / "metrics.json").read_text())["resumed_from_step"] == 2
    for name, batch in (("fixed", "8"), ("full", "8"), ("accum", "16")):
        extra = [a for a in runs[name] if a not in ("4", "--batch-size", "--grad-accum", "2")]
        single(["finetune", *common, *extra, "--batch-size", batch, "--output-dir", str(tmp_path / "one" / name)])
        one, ddp = tmp_path / "one" / name, tmp_path / "ddp" / name
        assert losses(one) == pytest.approx(losses(ddp), abs=5e-5)
        if name != "fixed":
            assert max_param_diff(one, ddp) < 1e-6
    assert json.loads((tmp_path / "ddp" / "accum" / "metrics.json").read_text())["global_batch_size"] == 16


@pytest.mark.slow
def test_hf_trainer_example_under_two_processes(tiny0, tmp_path):
    """transformers.Trainer + SparseGradTrainer with DDP (torchrun, gloo): both ranks end with identical deltas, rank 0
    writes adapter-only checkpoints (one RNG file per rank), the reloaded adapter reproduces the model."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = tmp_path / "trainer"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "docs" / "examples" / "hf_trainer.py"), "--model", str(tiny0[0]), "--max-train", "32",
         "--max-eval", "16", "--max-length", "32", "--batch-size", "4", "--output-dir", str(out)],
        capture_output=True, text=True, timeout=300, env=env, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("2 processes hold identical SparseGrad deltas") == 2
    assert "reloaded adapter reproduces the trained model" in proc.stdout
    names = {p.name for p in (out / "checkpoint-2").iterdir()}
    assert {"adapter_model.safetensors", "rng_state_0.pth", "rng_state_1.pth"} <= names
    assert "model.safetensors" not in names
