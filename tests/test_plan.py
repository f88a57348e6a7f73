"""The memory plan: shapes from the shipped configs, hand arithmetic for Llama-2-7B, a measured peak, refusal."""
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from gift_quant import plan as plan_mod
from gift_quant.devices import DeviceError, GiB, resolve
from gift_quant.modes import mode_for
from gift_quant.pipeline import plan_recipe, run_stages
from gift_quant.plan import (
    check_fits,
    meta_model,
    model_config,
    plan_lora,
    plan_reconstruct,
    plan_train,
    shape_of,
    shipped_configs,
)
from gift_quant.recipe import RecipeError
from gift_quant.recipe_file import load_recipe, parse_recipe

from .helpers import measured

RECIPES = Path(__file__).resolve().parent.parent / "recipes"

# parameter counts the model cards / safetensors indexes of these models state
PUBLISHED = {"meta-llama/Llama-2-7b-hf": 6_738_415_616, "meta-llama/Llama-2-13b-hf": 13_015_864_320,
             "meta-llama/Meta-Llama-3-8B": 8_030_261_248, "mistralai/Mistral-7B-v0.3": 7_248_023_552,
             "Qwen/Qwen2.5-7B": 7_615_616_512, "google/gemma-2-9b": 9_241_705_984,
             "google/gemma-3-1b-pt": 999_885_952, "Qwen/Qwen3-8B-Base": 8_190_735_360,
             "microsoft/Phi-3-mini-4k-instruct": 3_821_079_552}


def test_every_recipe_model_has_a_shipped_config_with_its_published_size():
    refs = {load_recipe(p).model.ref for p in RECIPES.glob("*.yaml")}
    hub = {r for r in refs if not r.startswith("pkg://")}
    assert hub <= set(shipped_configs()), hub - set(shipped_configs())
    for ref, n in PUBLISHED.items():
        r = parse_recipe({"model": {"ref": ref}})
        assert shape_of(meta_model(model_config(r)), r).params == n, ref


def test_llama2_7b_training_plan_by_hand():
    """W3 per-row + 128 salient columns, micro-batch 1 x 2048, bf16, checkpointing, on a GPU."""
    r = load_recipe(RECIPES / "llama-2-7b-w3.yaml", ["train.micro_batch_size=1"])
    parts = plan_train(shape_of(meta_model(model_config(r)), r), r, torch.device("cuda"))
    h, i, L, V, s = 4096, 11008, 32, 32000, 2048
    assert parts["codes (uint8)"] == L * (4 * h * h + 3 * h * i)
    assert parts["salient weights, gradients, AdamW moments (float32)"] == 16 * L * 128 * (5 * h + 2 * i)
    assert 16 * L * 128 * (5 * h + 2 * i) // 16 == 174_063_616  # the paper's "174M trainable parameters"
    assert parts["other parameters (embeddings, norms, head)"] == 2 * (2 * V * h + h)
    per_block = s * ((3 * h + 2 * h + 3 * i) * 2 + 8 * h)  # bf16, the norms' inputs in float32; no GQA: kv = h
    assert parts["activations (gradient checkpointing)"] == L * s * h * 2  # the block inputs
    # the backward's phase, max(1.6 blocks, a block beside the largest weight rebuilt with its noise: 2 x i x h x 2),
    # is below the loss's: the logits' phase is the plan's
    assert max(8 * per_block // 5, per_block + 4 * i * h) < s * V * 13
    assert parts["logits and loss (the larger of the two phases)"] == s * V * 13
    assert sum(parts.values()) <= 20e9  # the 24 GB card's goal, as planned
    # the LoRA baseline: the plain model dense in bf16, an adapter of the columns' size at the stage's rank
    # (round(128 (5h + 2i) / (11h + 3i)) = 70 a linear), and the adapted linears' inputs kept in the recomputed
    # blocks (the normed inputs of attention and MLP, down_proj's; o_proj's is kept by the attention anyway)
    lora = plan_lora(shape_of(meta_model(model_config(r)), r), r, torch.device("cuda"))
    assert lora["dense quantized weights"] == 2 * L * (4 * h * h + 3 * h * i)
    assert lora["LoRA adapter, gradients, AdamW moments (float32)"] == 16 * L * 70 * (11 * h + 3 * i)
    assert lora["activations (gradient checkpointing)"] == L * s * h * 2
    assert 8 * (per_block + s * (2 * h + i) * 2) // 5 < s * V * 13  # the recomputed block with the adapters' inputs
    assert "codes (uint8)" not in lora and lora["logits and loss (the larger of the two phases)"] == s * V * 13
    # a float32 model under bf16 autocast: every adapted linear keeps its own bf16 copy of its input (q, k, v, o,
    # gate, up: h each; down: i) and of its frozen weight, which puts the recomputed block's backward above the logits
    r32 = load_recipe(RECIPES / "llama-2-7b-w3.yaml", ["train.micro_batch_size=1", "model.dtype=float32"])
    lora32 = plan_lora(shape_of(meta_model(model_config(r32)), r32), r32, torch.device("cuda"))
    kept = s * (6 * h + i) * 2 + (4 * h * h + 3 * h * i) * 2
    assert lora32["activations (gradient checkpointing)"] == L * s * h * 4
    assert lora32["one block's backward (the larger of the two phases)"] == 8 * (per_block + kept) // 5


def test_llama2_7b_reconstruct_plan_by_hand():
    """One block in bf16 and its codes, three sets of block inputs (128 x 2048 x 4096 bf16: 2 GiB each), the larger
    of one batch's forward and backward and the fourth set (the quantized blocks' next inputs) beside a forward, the
    block's salient columns in float32 with AdamW; the whole stage fits a 24 GiB card."""
    r = load_recipe(RECIPES / "llama-2-7b-w3.yaml", ["reconstruct.enabled=true", "model.dtype=bfloat16"])
    parts = plan_reconstruct(shape_of(meta_model(model_config(r)), r), r, torch.device("cuda"), memory=24 * GiB)
    h, i, s, n, b = 4096, 11008, 2048, r.calibration.n_samples, r.reconstruct.batch_size
    block = 4 * h * h + 3 * h * i + 2 * h
    assert parts["block weights (full precision)"] == 2 * block and parts["block codes (uint8)"] == block
    assert parts["block inputs, targets and quantized inputs"] == 3 * n * s * h * 2 == 6 * GiB
    step = b * s * ((4 * h + 2 * h + 6 * i) * 2 + 2 * h)  # kv = h (MHA)
    after = n * s * h * 2 + b * s * (4 * h + 2 * h + 3 * i) * 2  # the next quantized inputs, one batch's forward
    assert parts["the larger phase: a batch's step, a weight rebuilt, or the next quantized inputs"] == max(step, after)
    assert parts["salient weights, gradients, AdamW moments (float32)"] == 16 * 128 * (5 * h + 2 * i)
    assert sum(parts.values()) <= 22 * GiB
    assert not any("latent" in name for name in parts)
    weights = load_recipe(RECIPES / "llama-2-7b-w3.yaml", ["reconstruct.enabled=true", "model.dtype=bfloat16",
                                                           "reconstruct.train=weights"])
    more = plan_reconstruct(shape_of(meta_model(model_config(weights)), weights), weights, torch.device("cuda"),
                            memory=24 * GiB)
    linear, rows = 4 * h * h + 3 * h * i, 4 * h + 2 * i + h  # a block's linear weights, and their rows (one grid a row)
    assert more["latent weights, grid, gradients, AdamW moments (float32)"] == 16 * (linear + 2 * rows)
    assert more["fake-quantized weights kept for backward (float32)"] == 12 * linear
    phase = "the larger phase: a batch's step, a weight rebuilt, or the next quantized inputs"
    assert more[phase] == max(step + b * s * 2 * h * 2, after)
    assert sum(more.values()) - sum(parts.values()) == 28 * linear + 32 * rows + more[phase] - parts[phase]
    assert sum(more.values()) <= 24 * GiB


def test_plan_against_a_measured_peak_on_the_cpu():
    """Stated tolerance: the plan's working memory of two training steps is an upper bound of the measured RSS rise
    and within 50% of it (the plan counts every buffer as alive at once). glibc's allocator is pinned to a fixed
    mmap threshold, so every large tensor goes back to the OS when freed and the RSS follows the live tensors: left
    to adapt, it keeps freed tensors in its heap or not from run to run, and the same steps measured 165-232 MB.
    The runtime is warmed up first at the model's widths (``gpu_check.warm_up``): the plan counts tensors, and what
    the process takes on first use differs from machine to machine (about 19 MB here, more on CI's)."""
    code = """
import gc, json, sys, tempfile, torch
from pathlib import Path
sys.path.insert(0, "benchmarks")
from gpu_check import config, quantized_model, warm_up
from gift_quant import devices
from gift_quant.plan import meta_model, plan_train, shape_of
from gift_quant.recipe_file import parse_recipe
from gift_quant.train import train
ckpt = CKPT
cfg = config(True, hidden_size=256, intermediate_size=704, num_hidden_layers=4, vocab_size=8192)
model = quantized_model(cfg, torch.device("cpu"), torch.float32, 16)
r = parse_recipe({"model": {"ref": "-"}, "saliency": {"k": 16},
                  "train": {"steps": 2, "micro_batch_size": 4, "seq_len": 256, "gradient_checkpointing": ckpt,
                            "noise": "gaussian", "checkpoint_every": 1000}})
parts = plan_train(shape_of(meta_model(cfg), r), r, torch.device("cpu"))
before = sum(v for k, v in parts.items() if k.startswith(("codes", "grid", "other")))  # already resident
ids = torch.randint(0, 8192, (16, 256))
warm_up(cfg, r.train, torch.device("cpu"))
gc.collect()
with tempfile.TemporaryDirectory() as w, devices.peak(torch.device("cpu")) as used:
    train(model, ids, ids.clone(), r.train, Path(w), device=torch.device("cpu"))
print(json.dumps([sum(parts.values()) - before, used.added]))
"""
    root = Path(__file__).resolve().parent.parent
    for ckpt in (False, True):
        planned, used = measured(code.replace("CKPT", str(ckpt)), cwd=root)
        assert 1.0 <= planned / used <= 1.5, (ckpt, planned, used)


def test_the_cpu_peak_counts_memory_freed_before_it_and_reused():
    """``devices.peak`` on the CPU: what a block allocates counts even where the C heap serves it from pages freed
    before the block (a stage after another reuses what the first freed; unseen, the RSS would not grow). 20 MB of
    malloc-sized buffers are freed below one kept buffer (so glibc cannot give the top of its heap back) and the same
    allocated again inside the measurement."""
    code = """
import json, torch
from gift_quant import devices
kept = [bytearray(16384) for _ in range(1280)]
pin = bytearray(16384)  # above them: the heap's top stays in use
del kept
with devices.peak(torch.device("cpu")) as used:
    again = [bytearray(16384) for _ in range(1280)]
print(json.dumps(used.added))
"""
    size = 1280 * 16384
    assert 0.9 * size <= measured(code, cwd=Path(__file__).resolve().parent.parent) <= 1.5 * size


def test_the_tokenizer_term_covers_what_a_loaded_tokenizer_holds():
    """On the CPU each stage's plan counts its tokenizer, ``TOKENIZER_BYTES`` a vocabulary entry: SmolLM2's (49152
    entries) measured loaded, the heap's freed pages returned (its load parses about twice as much again and frees
    it before any stage's work)."""
    code = """
import gc, json
from transformers import AutoTokenizer
from gift_quant.devices import _status_bytes, trim_heap
from gift_quant.sources import SMOLLM2, resolve_model
def held():
    gc.collect()
    trim_heap()
    return _status_bytes("RssAnon")
folder = resolve_model(SMOLLM2)
AutoTokenizer.from_pretrained(folder)  # first use: imports, caches
start = held()
tok = AutoTokenizer.from_pretrained(folder)
print(json.dumps([len(tok), held() - start]))
"""
    vocab, used = measured(code, cwd=Path(__file__).resolve().parent.parent)
    assert 1.0 <= plan_mod.TOKENIZER_BYTES * vocab / used <= 2.5, (vocab, used)  # 14 MB held here, 10-13 in a stage
    r = parse_recipe({"model": {"ref": "-"}})
    shape = plan_mod.Shape(blocks=1, hidden=8, kv=8, intermediate=8, heads=1, vocab=vocab, block_params=64,
                           other_params=64, linears=(plan_mod.Linear("q_proj", 8, 8, 1),))
    stages = [s for s in run_stages(r, mode_for(r, None)) if s.plan is not None]
    on = {d: plan_mod.plan(r, torch.device(d), stages, shape, memory=8 * GiB)["stages"] for d in ("cpu", "cuda")}
    assert on["cpu"] and all(st["parts"]["tokenizer"] == plan_mod.TOKENIZER_BYTES * vocab for st in on["cpu"].values())
    assert not any("tokenizer" in st["parts"] for st in on["cuda"].values())  # the host's, not the GPU's


@pytest.mark.parametrize("run_dtype", ["float32", "bfloat16"])
def test_a_checkpoint_in_the_runs_dtype_is_mapped_not_allocated(tmp_path, run_dtype):
    """What the CPU plan of the block-by-block stages assumes of transformers: a safetensors checkpoint loaded in
    its own dtype is memory-mapped (its pages are the page cache's: the anonymous RSS does not grow by the model),
    one loaded in another dtype is converted into memory; the plan counts the model in the second case only, and
    whole where the config names no dtype."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=32768, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)  # float32, as its config then says
    code = f"""
import gc, json, torch
from gift_quant import sources
from gift_quant.devices import _status_bytes
def anon():
    return _status_bytes("RssAnon")
sources.load_tokenizer = lambda *_a: None  # the model alone: a tokenizer's small allocations stay in the heap
model, _ = sources.load_model({str(tmp_path)!r}, torch.{run_dtype})  # first use: imports, caches
del model
gc.collect()
before = anon()
model, _ = sources.load_model({str(tmp_path)!r}, torch.{run_dtype})
added = anon() - before
print(json.dumps([added, sum(p.numel() * p.element_size() for p in model.parameters())]))
"""
    added, size = measured(code, cwd=Path(__file__).resolve().parent.parent)
    mapped = run_dtype == "float32"
    assert (added < 0.05 * size) if mapped else (added > 0.95 * size), (added, size)
    r = parse_recipe({"model": {"ref": str(tmp_path), "dtype": run_dtype}, "device": "cpu"})
    shape = shape_of(meta_model(model_config(r)), r)
    assert shape.stored == "float32"
    cpu = plan_mod.plan_quantize(shape, r, torch.device("cpu"), 8 * GiB)
    assert cpu.get("model on the CPU", 0) == (0 if mapped else shape.params * 2)
    assert cpu.get("block weights", 0) == (0 if mapped else shape.block_params * 2)  # the block is the model's
    # what quantize has written back into the mapped blocks when it quantizes the last one's down_proj: every
    # targeted weight of both blocks (q and o, k and v at half width, the MLP) but that one
    h, i = 256, 704
    written = (2 * (2 * h * h + 2 * h * h // 2 + 3 * h * i) - i * h) * 4
    written_part = "the blocks' weights written back (copied from the mapped checkpoint)"
    assert cpu.get(written_part, 0) == (written if mapped else 0)
    unknown = plan_mod.plan_quantize(replace(shape, stored=None), r, torch.device("cpu"), 8 * GiB)
    assert unknown["model on the CPU"] == shape.params * {"float32": 4, "bfloat16": 2}[run_dtype]
    assert "model on the CPU" not in plan_mod.plan_quantize(shape, r, torch.device("cuda"), 80 * GiB)


def test_a_run_that_does_not_fit_is_refused_with_the_knob(monkeypatch):
    monkeypatch.setattr(plan_mod, "capacity", lambda _d: 8 * GiB)
    r = load_recipe(RECIPES / "llama-2-7b-w3.yaml", ["train.micro_batch_size=1", "train.distill=1.0"])
    result = plan_recipe(r, torch.device("cpu"))
    assert not result["stages"]["train"]["fits"]
    assert "distillation teacher" in result["stages"]["train"]["parts"]
    with pytest.raises(RecipeError, match=r"stage train needs about .* GiB on cpu, 8.0 GiB usable; .*"
                                          r"train.gradient_checkpointing.*train.distill: 0"):
        check_fits(result)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_device_resolution_and_refusal():
    assert resolve("auto") == torch.device("cpu") and resolve("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match="device = 'cuda:1': this machine has no CUDA GPU.*--device cpu"):
        resolve("cuda:1")
    with pytest.raises(RecipeError, match=r"device = 'gpu': got 'gpu'; use auto, cpu, cuda or cuda:N"):
        parse_recipe({"model": {"ref": "x"}, "device": "gpu"})


def test_cli_plan_prints_the_stages(capsys):
    from gift_quant.cli import main

    assert main(["plan", str(RECIPES / "llama-3-8b-w3.yaml"), "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert set(result["stages"]) == {"quantize", "train", "evaluate"} and result["params"] == 8_030_261_248
    assert "memory plan on cpu" in err and "codes (uint8)" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="plans a GPU on a machine without one")
def test_plan_a_24gib_gpu_without_one(capsys):
    """``plan --device cuda --capacity 24GiB`` on a CPU-only machine: Llama-2-7B W3 by hand. ``recover`` keeps
    refusing the absent device (test_device_resolution_and_refusal)."""
    from gift_quant.cli import main

    assert main(["plan", str(RECIPES / "llama-2-7b-w3.yaml"), "--device", "cuda", "--capacity", "24GiB",
                 "--set", "train.micro_batch_size=1"]) == 0
    result = json.loads(capsys.readouterr().out)
    h, i, L, V, s, k = 4096, 11008, 32, 32000, 2048, 128
    assert result["device"] == "cuda:0" and result["capacity_bytes"] == 24 * 2**30
    assert result["usable_bytes"] == 23 * 2**30  # 1 GiB kept for the CUDA context
    # quantize, bf16 weights: one block, 128 x 2048 block inputs and outputs (they fit in 24 GiB), the float32
    # statistics of down_proj's 11008 inputs, and the larger of quantizing a layer (down_proj's column loop: its
    # permuted Hessian beside 10 bytes a weight; the clipping search before it, over 2**22 // 11008 = 381 rows of
    # the per-row grid at a time, 81 candidates of 7 thresholds each, beside the weight's float32 copy as the loop
    # is, and the weight rebuilt after it take less) and a batch's forward (4 x 2048, bf16)
    search = 381 * (max(24 * i, 16 * i + 48 * 81 * 7) + 32 * 81)
    gptq = max(4 * i * i + 10 * h * i + 4 * h * i, 8 * h * i + search + 4 * h * i, 14 * h * i)
    assert gptq == 4 * i * i + 14 * h * i
    forward = 4 * s * (4 * h + 2 * h + 3 * i) * 2
    block, inputs = 2 * (4 * h * h + 3 * h * i + 2 * h), 2 * 128 * s * h * 2
    # and the outputs of q, k, v, o, gate and up (all but down) served to later passes, 20 GB in bf16: cut to what
    # the inputs leave of half the card once the block is there
    served = min(128 * s * 2 * (4 * h + 2 * i), (24 * 2**30 - block) // 2 - inputs)
    assert served == (24 * 2**30 - block) // 2 - inputs
    quantize = block + inputs + 4 * i * i + 16 * i + max(gptq, forward) + served
    assert result["stages"]["quantize"]["bytes"] == quantize
    outs = 5 * h + 2 * i  # q, k, v, o, down give h outputs each; gate and up give i
    train = (L * (4 * h * h + 3 * h * i) + L * (8 * outs + 4 * outs + 7 * k * 8) + 2 * (2 * V * h + h)
             + 16 * L * k * outs + L * s * h * 2 + int(s * V * 13))  # the logits' phase the larger (above)
    assert result["stages"]["train"]["bytes"] == train
    assert result["stages"]["quantize"]["fits"] and result["stages"]["train"]["fits"]
    assert main(["plan", str(RECIPES / "llama-2-7b-w3.yaml"), "--device", "cuda", "--capacity", "lots"]) == 2
    assert "--capacity = 'lots': expected a positive size such as 24GiB" in capsys.readouterr().err
    assert main(["plan", str(RECIPES / "llama-2-7b-w3.yaml"), "--device", "cuda"]) == 2  # no GPU, no capacity
    assert "--capacity SIZE" in capsys.readouterr().err
