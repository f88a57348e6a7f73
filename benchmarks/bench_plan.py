"""The memory plan against what the stages take: the train stage's terms that grow with the logits and those that
grow with the blocks, every stage of a run, and GPTQ's working set.

    python benchmarks/bench_plan.py [--vocab 8192 65536] [--blocks 2 6]
        [--tables logits blocks fixed stages gptq reconstruct]
        [--stages train lora]

A tiny GIFT-SW Llama (W3 codes, 4 salient columns a layer) trains two steps of 4 windows of 256 tokens through the
product's ``train``, in float32 and under bf16 autocast. Each run is a process of its own with glibc's mmap
threshold pinned (the RSS then follows the live tensors) and reads its peak with ``devices.peak``.

* Logits: hidden 64, two blocks, once per vocabulary size, with no teacher, the cached top-32 teacher and the full
  teacher beside every step. The difference between the two vocabularies is what the logits cost (the other parts
  are alike in both), printed per logit element.
* Blocks: vocabulary 512, hidden 256 and 512 (MLP 2.75x), with and without gradient checkpointing, once per block
  count, for the train stage and for the LoRA baseline's (``plan.plan_lora``: the dense quantized model with a
  PEFT adapter of the salient columns' size). The difference between the two depths is what a block's activations
  cost, printed per block in MB.
* Fixed: with gradient checkpointing, the whole stage at hidden 128 to 768 (six blocks): what one recomputed block
  and its backward hold beside the block inputs.
* Stages: every stage of ``gift-quant recover`` (quantize, reconstruct of every weight, the top-32 teacher, train,
  the LoRA baseline, export, evaluate) on a tiny Llama of SmolLM2's vocabulary (hidden 256, four blocks), the model
  saved and run in float32 and in bfloat16, with and without the teacher: the plan (``pipeline.plan_recipe``) against what each
  stage added to the process (its manifest's ``peak_memory_added_bytes``), the run done once before in the same
  process at the same shapes; and beside it what the stage allocated, its RSS less the pages of memory-mapped files
  (the checkpoint read in place), which the plan does not count (``SAMPLER``).

* Reconstruct: ``reconstruct_model`` alone (the salient columns, or every weight) on a tiny Llama of two blocks held
  in memory, in float32 and bfloat16, against the reconstruct stage's terms (``plan.plan_reconstruct``).

* GPTQ: one linear quantized by ``gptq.gptq`` (the clipping search, then the column loop), per layer shape from the
  tiny model's to Llama-3-8B's MLP, against the quantize stage's term for it (``plan.gptq_bytes``).

Each row of the first three: planned (``plan.plan_train``, less the model's codes, grid and other parameters, which
are in memory before the stage starts) against measured, their ratio, and the whole stage's ratio at the larger size.
Every measurement follows a warm-up at the same widths (``gpu_check.warm_up``): the plan counts tensors, not what the
process takes on first use. The goal is a plan at most 10% above what is measured, never below.
"""
from __future__ import annotations

import argparse

from common import row, run_measured, table

CHILD = """
import gc, sys, tempfile, torch
from pathlib import Path
sys.path.insert(0, "benchmarks")
from common import emit
from gpu_check import config, quantized_model, warm_up
from gift_quant import devices
from gift_quant.distill import TopKTeacher
from gift_quant.plan import meta_model, plan_lora, plan_train, shape_of
from gift_quant.recipe_file import parse_recipe
from gift_quant.train import train
vocab, precision, teacher_kind, blocks, hidden, ckpt, stage = sys.argv[1:]
vocab, blocks, hidden = int(vocab), int(blocks), int(hidden)
cfg = config(True, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=blocks,
             vocab_size=vocab)


def adapt(model):  # the LoRA stage's model: the dense quantized weights, an adapter of the columns' size
    if stage != "lora":
        return model
    from peft import LoraConfig, get_peft_model
    from gift_quant.layers import merge_to_dense
    from gift_quant.lora import lora_rank
    from gift_quant.recipe import ALL_PROJECTIONS
    merge_to_dense(model)
    shapes = [(m.in_features, m.out_features) for n, m in model.named_modules() if n.endswith(tuple(ALL_PROJECTIONS))]
    rank = lora_rank(4 * sum(o for _, o in shapes), shapes)
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                            target_modules=ALL_PROJECTIONS))


model = adapt(quantized_model(cfg, torch.device("cpu"), torch.float32, 0 if stage == "lora" else 4))
distill = {"none": {}, "top-32": {"distill": 1.0, "distill_topk": 32}, "full": {"distill": 1.0}}[teacher_kind]
r = parse_recipe({"model": {"ref": "-"}, "saliency": {"k": 4},
                  "train": {"steps": 2, "micro_batch_size": 4, "seq_len": 256, "precision": precision,
                            "noise": "gaussian", "checkpoint_every": 1000, "gradient_checkpointing": ckpt == "1",
                            **distill}})
ids = torch.randint(0, vocab, (8, 256), generator=torch.Generator().manual_seed(0))
teacher = None
if teacher_kind == "top-32":  # the cache is on the CPU before the stage; a full teacher loads within it (below)
    g = torch.Generator().manual_seed(1)
    teacher = TopKTeacher({"logp": torch.randn(8, 255, 32, generator=g).log_softmax(-1),
                           "idx": torch.randint(0, vocab, (8, 255, 32), generator=g, dtype=torch.int32),
                           "windows": torch.arange(8)}, 8, 1.0)
plan = plan_lora if stage == "lora" else plan_train
parts = plan(shape_of(meta_model(cfg), r), r, torch.device("cpu"))
planned = sum(v for k, v in parts.items() if not k.startswith(("codes", "grid", "other", "dense")))  # resident
warm_up(cfg, r.train, torch.device("cpu"), adapt)
gc.collect()
with tempfile.TemporaryDirectory() as w, devices.peak(torch.device("cpu")) as used:
    if teacher_kind == "full":
        from transformers import AutoModelForCausalLM
        teacher = AutoModelForCausalLM.from_config(cfg).eval()
    train(model, ids, ids.clone(), r.train, Path(w), device=torch.device("cpu"), teacher=teacher, checkpoints=False)
emit({"planned": planned, "measured": used.added})
"""


STAGES_CHILD = """
import json, sys, tempfile, torch
from pathlib import Path
sys.path.insert(0, "benchmarks")
from common import emit
from gpu_check import config
from transformers import AutoModelForCausalLM
from gift_quant import pipeline
from gift_quant.recipe_file import parse_recipe
from gift_quant.sources import SMOLLM2, load_tokenizer
dtype, teacher = sys.argv[1:]
work = Path(tempfile.mkdtemp())
tok = load_tokenizer(SMOLLM2)
torch.manual_seed(0)
cfg = config(True, hidden_size=256, intermediate_size=704, num_hidden_layers=4, vocab_size=len(tok))
AutoModelForCausalLM.from_config(cfg).to(getattr(torch, dtype)).save_pretrained(work / "model")  # as hubs ship
tok.save_pretrained(work / "model")
distill = {"distill": 1.0, "distill_topk": 32} if teacher == "top-32" else {"distill": 0.0, "distill_topk": None}


def recipe(out):
    return parse_recipe({"name": "bench", "model": {"ref": str(work / "model"), "dtype": dtype}, "device": "cpu",
                         "output_dir": str(work / out),
                         "calibration": {"n_samples": 8, "seq_len": 256, "batch_size": 4},
                         "saliency": {"k": 8}, "quant": {"bits": 3, "group_size": 64},
                         "reconstruct": {"enabled": True, "train": "weights", "epochs": 1, "batch_size": 4},
                         "train": {"steps": 4, "micro_batch_size": 4, "seq_len": 256, "checkpoint_every": 1000,
                                   **distill},
                         "eval": {"ppl_seq_len": 256, "ppl_max_windows": 8, "batch_size": 4, "tasks": [],
                                  "baselines": ["salient", "lora"]},
                         "export": {"formats": ["gift"]}}, "bench")


pipeline.recover(recipe("warm"))  # first use at these shapes: imports, thread pools, the kernels' caches
r = recipe("run")
with sampled() as samples:
    pipeline.recover(r)
planned = pipeline.plan_recipe(r, torch.device("cpu"))["stages"]
got = {}
for name in pipeline.stages(r):
    added = json.loads((work / "run" / name / "manifest.json").read_text())["peak_memory_added_bytes"]
    got[name] = [planned[name]["bytes"] if name in planned else None, added, allocated(samples, name, added)]
emit(got)
"""

# What a stage allocated, apart from the pages of memory-mapped files (the checkpoint read in place) that the RSS
# counts too: anonymous and file-backed RSS sampled every 2 ms, each stage cut out by the pipeline's log lines. The
# stage's added RSS less its file pages' growth, or the largest anonymous growth sampled, whichever is larger: both
# are at most what was allocated at the peak.
SAMPLER = """
import logging, threading, time
from contextlib import contextmanager
from gift_quant.devices import _status_bytes


def rss() -> tuple[int, int]:
    return _status_bytes("RssAnon"), _status_bytes("RssFile")


@contextmanager
def sampled():
    samples, marks, stop = [], [], threading.Event()

    class Marks(logging.Handler):
        def emit(self, record):
            marks.append((time.monotonic(), record.getMessage()))

    def sample():
        while not stop.is_set():
            samples.append((time.monotonic(), *rss()))
            time.sleep(0.002)

    handler, log = Marks(), logging.getLogger("gift_quant.pipeline")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield {"samples": samples, "marks": marks}
    finally:
        stop.set()
        thread.join()
        log.removeHandler(handler)


def allocated(got: dict, name: str, added: int) -> int:
    start = next(t for t, m in got["marks"] if m == f"stage {name}: running")
    end = next(t for t, m in got["marks"] if m.startswith(f"stage {name}: finished"))
    inside = [(a, f) for t, a, f in got["samples"] if start <= t <= end]
    if not inside:
        return added
    return max(added - (max(f for _, f in inside) - inside[0][1]), max(a for a, _ in inside) - inside[0][0])
"""


GPTQ_CHILD = """
import sys, torch
sys.path.insert(0, "benchmarks")
from common import emit
from gift_quant import devices
from gift_quant.gptq import gptq
from gift_quant.plan import Linear, gptq_bytes
from gift_quant.recipe_file import parse_recipe
n_out, n_in, group, bits = map(int, sys.argv[1:])
r = parse_recipe({"name": "bench", "model": {"ref": "unused"}, "quant": {"bits": bits, "group_size": group}}, "bench")
g = torch.Generator().manual_seed(0)
w = torch.randn(n_out, n_in, generator=g) * 0.02
x = torch.randn(2 * n_in, n_in, generator=g)
h = x.T @ x  # a Hessian of full rank, as calibration gives
del x
gptq(w[:8, :64], h[:64, :64], r.quant.grid(), torch.arange(8))  # first use: thread pools, kernels
with devices.peak(torch.device("cpu")) as used:
    gptq(w, h, r.quant.grid(), torch.arange(8), r.quant.damp, r.quant.block_size)
emit({"planned": gptq_bytes(Linear("w", n_in, n_out, 8), r), "measured": used.added})
"""

RECONSTRUCT_CHILD = """
import gc, sys, tempfile, torch
from pathlib import Path
sys.path.insert(0, "benchmarks")
from common import emit
from gpu_check import config
from transformers import AutoModelForCausalLM
from gift_quant import devices
from gift_quant.plan import meta_model, plan_reconstruct, shape_of
from gift_quant.quantize import quantize_model
from gift_quant.recipe_file import parse_recipe
from gift_quant.reconstruct import reconstruct_model
dtype, hidden, train = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cfg = config(True, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=2, vocab_size=512)
r = parse_recipe({"model": {"ref": "-", "dtype": dtype}, "device": "cpu", "saliency": {"k": 8},
                  "calibration": {"n_samples": 8, "seq_len": 256, "batch_size": 4},
                  "quant": {"bits": 3, "group_size": 64},
                  "reconstruct": {"enabled": True, "train": train, "epochs": 1, "batch_size": 4}})
torch.manual_seed(0)
windows = torch.randint(0, 512, (8, 256))


def run():  # the model in memory (nothing mapped), quantized, then a fresh copy reconstructed against it
    model = AutoModelForCausalLM.from_config(cfg).to(getattr(torch, dtype)).eval()
    results = quantize_model(model, windows, r.saliency, r.quant, batch_size=4)
    model = AutoModelForCausalLM.from_config(cfg).to(getattr(torch, dtype)).eval()
    gc.collect()
    with tempfile.TemporaryDirectory() as w, devices.peak(torch.device("cpu")) as used:
        reconstruct_model(model, windows, results, r.reconstruct, Path(w), "key", 0)
    return used.added


run()  # first use at these shapes
measured = run()
parts = plan_reconstruct(shape_of(meta_model(cfg), r), r, torch.device("cpu"))
before = ("model", "block weights", "block codes", "codes", "grid")  # in memory before the call: the model (its
# block with it), every layer's codes and grid
emit({"planned": sum(v for k, v in parts.items() if not k.startswith(before)), "measured": measured})
"""

# (out, in) of the layers measured: the tiny model's MLP, a 1B model's (TinyLlama) and Llama-3-8B's down and up
GPTQ_SHAPES = [(704, 256), (256, 704), (2048, 5632), (5632, 2048), (4096, 14336), (14336, 4096)]


def gptq_table() -> None:
    """GPTQ on one linear (``plan.gptq_bytes``, the quantize stage's term) against what the call adds, per layer shape
    at the recipes' grids (the clipping search on, groups of 128 or per row)."""
    print()
    table("out x in", "bits", "groups", "planned MB", "measured MB", "planned / measured")
    for n_out, n_in in GPTQ_SHAPES:
        for bits, group in ((3, 128), (2, 64), (4, -1)):
            got = run_measured(GPTQ_CHILD, str(n_out), str(n_in), str(group), str(bits))
            row(f"{n_out} x {n_in}", bits, group, f"{got['planned'] / 1e6:.1f}", f"{got['measured'] / 1e6:.1f}",
                f"{got['planned'] / got['measured']:.2f}")


def stage_table() -> None:
    """Every stage of a tiny run, planned against what it added to the process."""
    print()
    table("stage", "model dtype", "teacher", "planned MB", "measured MB (RSS)", "planned / measured",
          "allocated MB (RSS less mapped files)", "planned / allocated")
    for dtype in ("float32", "bfloat16"):
        for teacher in ("none", "top-32"):
            for stage, (planned, used, alloc) in run_measured(SAMPLER + STAGES_CHILD, dtype, teacher).items():
                row(stage, dtype, teacher, f"{planned / 1e6:.1f}" if planned else "-", f"{used / 1e6:.1f}",
                    f"{planned / used:.2f}" if planned and used > 0 else "-", f"{alloc / 1e6:.1f}",
                    f"{planned / alloc:.2f}" if planned and alloc > 0 else "-")


def reconstruct_table() -> None:
    """``reconstruct.reconstruct_model`` alone on a tiny Llama of two blocks held in memory, planned (the stage's
    terms, less what is in memory before the call) against what the call adds."""
    print()
    table("model dtype", "hidden", "trains", "planned MB", "measured MB", "planned / measured")
    for dtype in ("float32", "bfloat16"):
        for hidden in (256, 512):
            for train in ("columns", "weights"):
                got = run_measured(RECONSTRUCT_CHILD, dtype, str(hidden), train)
                row(dtype, hidden, train, f"{got['planned'] / 1e6:.1f}", f"{got['measured'] / 1e6:.1f}",
                    f"{got['planned'] / got['measured']:.2f}")


def measure(vocab: int, precision: str, teacher: str = "none", blocks: int = 2, hidden: int = 64,
            checkpointing: bool = False, stage: str = "train") -> dict:
    return run_measured(CHILD, str(vocab), precision, teacher, str(blocks), str(hidden), "1" if checkpointing else "0",
                        stage)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, nargs=2, default=[8192, 65536])
    ap.add_argument("--blocks", type=int, nargs=2, default=[2, 6])
    ap.add_argument("--tables", nargs="+", default=["logits", "blocks", "fixed", "stages", "gptq", "reconstruct"],
                    choices=["logits", "blocks", "fixed", "stages", "gptq", "reconstruct"])
    ap.add_argument("--stages", nargs="+", default=["train", "lora"], choices=["train", "lora"], help="of the blocks")
    args = ap.parse_args()
    if "logits" in args.tables:
        logits(*args.vocab)
    if "blocks" in args.tables:
        blocks(*args.blocks, args.stages)
    if "fixed" in args.tables:
        fixed(args.blocks[1], args.stages)
    if "stages" in args.tables:
        stage_table()
    if "gptq" in args.tables:
        gptq_table()
    if "reconstruct" in args.tables:
        reconstruct_table()


def logits(small: int, large: int) -> None:
    elements = 4 * 256 * (large - small)  # logit elements a micro-batch adds between the two vocabularies
    table("precision", "teacher", "planned B / logit", "measured B / logit", "planned / measured",
          f"whole stage planned / measured (vocab {large})")
    for precision in ("fp32", "bf16"):
        for teacher in ("none", "top-32", "full"):
            a, b = measure(small, precision, teacher), measure(large, precision, teacher)
            planned = (b["planned"] - a["planned"]) / elements
            measured = (b["measured"] - a["measured"]) / elements
            row(precision, teacher, f"{planned:.1f}", f"{measured:.1f}", f"{planned / measured:.2f}",
                f"{b['planned'] / b['measured']:.2f}")
    print()


def blocks(few: int, many: int, stages: list[str]) -> None:
    table("stage", "precision", "hidden", "checkpointing", "planned MB / block", "measured MB / block",
          "planned / measured", f"whole stage planned / measured ({many} blocks)")
    for stage in stages:
        for precision in ("fp32", "bf16"):
            for hidden in (256, 512):
                for ckpt in (False, True):
                    a, b = (measure(512, precision, "none", n, hidden, ckpt, stage) for n in (few, many))
                    planned = (b["planned"] - a["planned"]) / (many - few) / 1e6
                    measured = (b["measured"] - a["measured"]) / (many - few) / 1e6
                    row(stage, precision, hidden, "yes" if ckpt else "no", f"{planned:.2f}", f"{measured:.2f}",
                        f"{planned / measured:.2f}", f"{b['planned'] / b['measured']:.2f}")



def fixed(blocks: int, stages: list[str]) -> None:
    """With gradient checkpointing the stage holds the block inputs and what one block's recomputation and backward
    need beside them: the whole stage, planned against measured, across hidden sizes (the block inputs and the
    recomputed block grow with it; what does not grow is the runtime's own)."""
    print()
    table("stage", "precision", "hidden", f"planned MB ({blocks} blocks)", "measured MB", "planned / measured")
    for stage in stages:
        for precision in ("fp32", "bf16"):
            for hidden in (128, 256, 384, 512, 768):
                got = measure(512, precision, "none", blocks, hidden, True, stage)
                row(stage, precision, hidden, f"{got['planned'] / 1e6:.1f}", f"{got['measured'] / 1e6:.1f}",
                    f"{got['planned'] / got['measured']:.2f}")


if __name__ == "__main__":
    main()
