"""Serving speed of the exports: vLLM's CPU engine on ``gptq4_lora`` (with and without the adapter) and on the dense
export, beside transformers on the ``gift`` export, one request and eight at once.

    python benchmarks/bench_serve.py [--vllm-python .serve-venv/bin/python] [--run .serve-check/bench] [--tokens 64]

The exports come from ``serve_check``'s short demo run with the dense format added, in a run folder of its own. Each
server starts with the model card's command (``gptq4_lora_format.serve_command``; the dense export without
``--enable-lora``), on loopback, and is stopped after its rows. A request: a 64-token prompt, ``--tokens`` greedy
tokens streamed (``ignore_eos``); time to first token from the request to the first streamed token, decode
tokens/s from the first to the last. Eight at once: eight such requests in threads, their summed tokens over the
wall time from the first request to the last token. transformers: ``exports.load`` of the gift export in bfloat16
(its layers through torch's packed kernels) and ``generate`` of the same prompt, one request. Prints one table.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import row, table  # noqa: E402
from serve_check import ROOT, export_run, start_server, stop_server, wait_ready  # noqa: E402

from gift_quant import exports  # noqa: E402
from gift_quant.gptq4_lora_format import max_lora_rank  # noqa: E402
from gift_quant.sources import load_tokenizer  # noqa: E402

PROMPT = ("The history of the city begins with a small settlement on the river, where traders stopped on their way "
          "to the coast. Over the centuries it grew into a market town, and")


def stream(port: int, model: str, prompt: list[int], tokens: int) -> tuple[float, float, int]:
    """One streamed greedy completion: (seconds to the first token, seconds from first to last token, tokens)."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0.0, "stream": True,
                       "ignore_eos": True}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"})
    t0 = time.time()
    first = last = None
    n = 0
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            if json.loads(line[5:])["choices"][0]["text"] is not None:
                last = time.time()
                first = first or last
                n += 1
    return first - t0, last - first, n


def served_rows(python: str, folder: Path, port: int, models: list[str], prompt: list[int], tokens: int,
                lora_rank: int | None, log: Path) -> list[tuple]:
    server = start_server(python, folder, port, lora_rank, log)
    rows = []
    try:
        wait_ready(server, port, log, 600)
        for model in models:
            stream(port, model, prompt, 4)  # warm-up
            ttft, decode, n = stream(port, model, prompt, tokens)
            results = []
            t0 = time.time()
            threads = [threading.Thread(target=lambda m=model: results.append(stream(port, m, prompt, tokens)))
                       for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.time() - t0
            rows.append((model, ttft, (n - 1) / decode, sum(r[2] for r in results) / wall))
    finally:
        stop_server(server)
    return rows


@torch.no_grad()
def transformers_row(folder: Path, prompt: list[int], tokens: int) -> tuple:
    model, _ = exports.load(folder, torch.bfloat16)
    ids = torch.tensor([prompt])
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    t0 = time.time()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
    ttft = time.time() - t0
    t0 = time.time()
    model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return ("transformers, gift export (bf16)", ttft, tokens / (time.time() - t0), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vllm-python", default=str(ROOT / ".serve-venv/bin/python"))
    ap.add_argument("--run", default=str(ROOT / ".serve-check/bench"))
    ap.add_argument("--port", type=int, default=8732)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    run = Path(args.run)
    folder = export_run(run, ("gptq4_lora", "gift", "dense"))
    prompt = load_tokenizer(str(folder))(PROMPT, add_special_tokens=False)["input_ids"]
    rank = max_lora_rank(json.loads((folder / "adapter" / "adapter_config.json").read_text())["r"])
    rows = served_rows(args.vllm_python, folder, args.port, ["salient", str(folder)], prompt, args.tokens, rank,
                       run / "bench_serve_gptq4.log")
    rows += served_rows(args.vllm_python, run / "export" / "dense", args.port, [str(run / "export" / "dense")],
                        prompt, args.tokens, None, run / "bench_serve_dense.log")
    rows.append(transformers_row(run / "export" / "gift", prompt, args.tokens))
    names = {"salient": "vLLM, gptq4_lora with the adapter (the recovered model)", str(folder):
             "vLLM, gptq4_lora without the adapter", str(run / "export" / "dense"): "vLLM, dense export"}
    table("served", "time to first token s", "decode tokens/s, one request", "tokens/s, eight at once")
    for name, ttft, decode, eight in rows:
        row(names.get(name, name), f"{ttft:.3f}", f"{decode:.1f}", "-" if eight is None else f"{eight:.1f}")


if __name__ == "__main__":
    main()
