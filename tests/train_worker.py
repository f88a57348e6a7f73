"""Tiny post-quantization GIFT-SW run, used by the tests in-process and under torchrun (DDP on gloo).

    torchrun --nproc_per_node 2 tests/train_worker.py OUT_DIR STEPS [CRASH_AT_STEP]
"""
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from gift_quant.grid import Grid
from gift_quant.layers import wrap_quantized
from gift_quant.quantize import rtn_with_columns
from gift_quant.recipe import TrainSpec
from gift_quant.train import train, trainable_state

sys.path.insert(0, str(Path(__file__).parent))
from conftest import crash_at, tiny_llama  # noqa: E402


def build(seed: int = 0):
    model = tiny_llama(seed)
    results = rtn_with_columns(model, Grid(3), lambda _i, m: torch.arange(0, m.in_features, 16))  # 1/16 salient
    wrap_quantized(model, results, "gaussian", 4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 16, (64, 32), generator=g)  # learnable: only 16 of the 256 tokens occur
    return model, ids


def run(out: Path, steps: int, on_step=None, lr: float = 3e-2, **overrides):
    model, ids = build()
    spec = TrainSpec(steps=steps, lr=lr, micro_batch_size=4, grad_accum=2, seq_len=32, checkpoint_every=3,
                     warmup_ratio=0.0, **overrides)
    summary = train(model, ids, ids.clone(), spec, out, seed=0, on_step=on_step)
    return model, summary


if __name__ == "__main__":
    import torch.distributed as dist

    out, steps = Path(sys.argv[1]), int(sys.argv[2])
    kill = int(sys.argv[3]) if len(sys.argv) > 3 else None

    model, summary = run(out, steps, on_step=None if kill is None else crash_at(kill, SystemExit(3)))
    rank = dist.get_rank() if dist.is_initialized() else 0
    save_file(trainable_state(model), out / f"salient-rank{rank}.safetensors")
    (out / f"world-rank{rank}.txt").write_text(str(summary["processes"]))
    print("world", summary["processes"], "rank", rank, "loss", summary["final_loss"])
