"""The memory plan against what the stages take: the train stage's terms that grow with the logits and those that
grow with the blocks, every stage of a run, and GPTQ's working set.

    python benchmarks/bench_plan.py [--vocab 8192 65536] [--blocks 2 6]
        [--tables logits blocks fixed stages gptq reconstruct tokenizer]
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

* GPTQ: one linear quantized as the quantize stage does it (its salient columns, the clipping search, GPTQ's column
  loop, the dense weight written back), per layer shape from the tiny model's to Llama-3-8B's MLP, in float32 and
  bfloat16, against the quantize stage's term for it (``plan.gptq_bytes``).

* Tokenizer: a fast tokenizer loaded, SmolLM2's and byte-level BPE ones of 4k to 32k entries trained on the bundled
  text, against the host memory the plan counts for it on the CPU (``plan.TOKENIZER_BYTES`` an entry).

Each row of the first three: planned (``plan.plan_train``, less the model's codes, grid and other parameters, which
are in memory before the stage starts) against measured, their ratio, and the whole stage's ratio at the larger size.
Every measurement follows a warm-up at the same widths (``gpu_check.warm_up``): the plan counts tensors, not what the
process takes on first use. The goal is a plan at most 10% above what is measured, never below.
"""
from __future__ import annotations

import argparse

from common import row, run_measured, table

from gift_quant.plan import TOKENIZER_BYTES

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
from gift_quant.devices import _status_bytes, trim_heap


def rss() -> tuple[int, int]:
    return _status_bytes("RssAnon"), _status_bytes("RssFile")


@contextmanager
def sampled():
    samples, marks, stop = [], [], threading.Event()

    class Marks(logging.Handler):
        def emit(self, record):
            if record.getMessage().endswith(": running"):
                trim_heap()  # as the stage's own measurement does (``devices.peak``)
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
from torch import nn
sys.path.insert(0, "benchmarks")
from common import emit
from gift_quant import devices
from gift_quant.calibrate import InputStats
from gift_quant.plan import Linear, gptq_bytes
from gift_quant.quantize import quantize_with_stats
from gift_quant.recipe_file import parse_recipe
n_out, n_in, group, bits = map(int, sys.argv[1:5])
dtype = getattr(torch, sys.argv[5])
r = parse_recipe({"name": "bench", "model": {"ref": "unused", "dtype": sys.argv[5]}, "saliency": {"k": 8},
                  "quant": {"bits": bits, "group_size": group}}, "bench")


def layer(n_out, n_in):  # one linear as the quantize stage finds it, and its input statistics
    g = torch.Generator().manual_seed(0)
    model = nn.ModuleDict({"down_proj": nn.Linear(n_in, n_out, bias=False)}).to(dtype)
    model["down_proj"].weight.data = (torch.randn(n_out, n_in, generator=g) * 0.02).to(dtype)
    stats = InputStats(n_in)
    stats.update(torch.randn(2 * n_in, n_in, generator=g))  # a Hessian of full rank, as calibration gives
    return model, {"down_proj": stats}


quantize_with_stats(*layer(8, 64), r.saliency, r.quant)  # first use: thread pools, kernels
model, stats = layer(n_out, n_in)
with devices.peak(torch.device("cpu")) as used:  # what the stage does a layer: columns, GPTQ, the weight written
    quantize_with_stats(model, stats, r.saliency, r.quant)
emit({"planned": gptq_bytes(Linear("down_proj", n_in, n_out, 8), r), "measured": used.added})
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
before = ("model", "block weights", "block codes", "codes", "grid", "salient columns")  # in memory before the call:
# the model (its block with it), every layer's result (codes, grid, salient columns)
emit({"planned": sum(v for k, v in parts.items() if not k.startswith(before)), "measured": measured})
"""

TOKENIZER_CHILD = """
import gc, sys, tempfile
from pathlib import Path
sys.path.insert(0, "benchmarks")
from common import emit
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from gift_quant.devices import _status_bytes, trim_heap
from gift_quant.sources import C4, SMOLLM2, local_or_package, resolve_model
size = int(sys.argv[1])
if size:  # a byte-level BPE tokenizer of ``size`` entries trained on the bundled text
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator([local_or_package(C4).read_text()] * 4,
                            trainers.BpeTrainer(vocab_size=size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = tempfile.mkdtemp()
    PreTrainedTokenizerFast(tokenizer_object=bpe).save_pretrained(folder)
    del bpe
else:
    folder = resolve_model(SMOLLM2)


def anon(trim=True):
    gc.collect()
    if trim:
        trim_heap()
    return _status_bytes("RssAnon")


tok = AutoTokenizer.from_pretrained(folder)  # first use: imports, caches
vocab = len(tok)
del tok
start = anon()
tok = AutoTokenizer.from_pretrained(folder)
emit({"vocab": vocab, "load": anon(trim=False) - start, "held": anon() - start})
"""

# (out, in) of the layers measured: the tiny model's MLP, a 1B model's (TinyLlama) and Llama-3-8B's down and up
GPTQ_SHAPES = [(704, 256), (256, 704), (2048, 5632), (5632, 2048), (4096, 14336), (14336, 4096)]


def gptq_table() -> None:
    """One linear quantized as the quantize stage does it (``quantize.quantize_with_stats``: salient columns, GPTQ,
    the dense weight written back; ``plan.gptq_bytes``, the stage's term) against what the call adds, per layer shape
    at the recipes' grids (the clipping search on, groups of 128 or per row), the weight in float32 and bfloat16."""
    print()
    table("out x in", "dtype", "bits", "groups", "planned MB", "measured MB", "planned / measured")
    for n_out, n_in in GPTQ_SHAPES:
        for dtype, bits, group in (("float32", 3, 128), ("float32", 2, 64), ("float32", 4, -1), ("bfloat16", 3, 128)):
            got = run_measured(GPTQ_CHILD, str(n_out), str(n_in), str(group), str(bits), dtype)
            row(f"{n_out} x {n_in}", dtype, bits, group, f"{got['planned'] / 1e6:.1f}",
                f"{got['measured'] / 1e6:.1f}", f"{got['planned'] / got['measured']:.2f}")


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


def tokenizer_table() -> None:
    """A fast tokenizer loaded (``AutoTokenizer``), SmolLM2's and byte-level BPE ones trained on the bundled text:
    what it holds once loaded (the heap's free pages returned) against the plan's ``TOKENIZER_BYTES`` a vocabulary
    entry, and the resident growth of the load itself, its freed parse included."""
    print()
    table("tokenizer", "vocabulary", "planned MB", "held MB", "load MB", "planned / held", "held bytes an entry")
    for size in (4000, 16000, 32000, 0):
        got = run_measured(TOKENIZER_CHILD, str(size))
        planned = TOKENIZER_BYTES * got["vocab"]
        row("SmolLM2" if size == 0 else "BPE", got["vocab"], f"{planned / 1e6:.1f}", f"{got['held'] / 1e6:.1f}",
            f"{got['load'] / 1e6:.1f}", f"{planned / got['held']:.2f}", f"{got['held'] / got['vocab']:.0f}")


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
    tables = ["logits", "blocks", "fixed", "stages", "gptq", "reconstruct", "tokenizer"]
    ap.add_argument("--tables", nargs="+", default=tables, choices=tables)
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
    if "tokenizer" in args.tables:
        tokenizer_table()


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
