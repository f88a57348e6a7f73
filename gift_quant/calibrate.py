"""Calibration statistics, block by block through the decoder.

Only one decoder block's inputs are held at a time (``n_windows x seq_len x hidden``); per targeted
linear layer we accumulate the Hessian ``X^T X`` and the column norms ``max|X_j|``, ``||X_j||_2``,
``||X_j||_1``. With ``sequential=True`` (GPTQ's default) block ``i+1`` is fed the outputs of block
``i`` *after* the callback has quantized it.

The model may stay on the CPU while the work happens on ``device``: each block moves there for its
statistics and quantization and goes back afterwards, so the device holds one block, its inputs and
its Hessians, never the model. The block inputs stay on the device when they fit and otherwise wait
in pinned CPU memory, one batch crossing at a time.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from accelerate.utils import send_to_device
from torch import nn
from tqdm.auto import tqdm

from .devices import capacity
from .families import decoder_layers, layer_types

log = logging.getLogger(__name__)


@dataclass
class InputStats:
    """Streaming statistics of a linear layer's input features."""

    n_features: int
    device: torch.device | str = "cpu"
    hessian: torch.Tensor = field(init=False)  # sum over tokens of x x^T, float32 as the GPTQ tools keep it
    absmax: torch.Tensor = field(init=False)
    abssum: torch.Tensor = field(init=False)
    n_tokens: int = 0

    def __post_init__(self) -> None:
        n, d = self.n_features, self.device
        self.hessian = torch.zeros(n, n, device=d)
        self.absmax = torch.zeros(n, device=d)
        self.abssum = torch.zeros(n, dtype=torch.float64, device=d)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float().to(self.hessian.device)
        self.hessian += x.T @ x
        a = x.abs()
        self.absmax = torch.maximum(self.absmax, a.amax(0))
        self.abssum += a.sum(0).double()
        self.n_tokens += x.shape[0]

    def move(self, device: torch.device | str) -> "InputStats":
        """Move the statistics to ``device`` in place (layers sharing this object see the move); return self."""
        self.hessian, self.absmax, self.abssum = (t.to(device) for t in (self.hessian, self.absmax, self.abssum))
        self.device = device
        return self

    def norm(self, rho: float) -> torch.Tensor:
        """``||X_j||_rho`` over all calibration tokens, for rho in {1, 2, inf}."""
        if rho == math.inf:
            return self.absmax.clone()
        if rho == 2:
            return self.hessian.diagonal().sqrt()  # sum_t x_tj^2 is H's diagonal
        if rho == 1:
            return self.abssum.float()
        raise ValueError(f"saliency rho={rho}: streamed statistics support 1, 2 or inf")

    def gptq_hessian(self) -> torch.Tensor:
        """``H = 2/n sum x x^T``, the Hessian of the layer's mean squared output error.

        Computed in float32 exactly as IST-DASLab/gptq and gptqmodel do (fp32 partial sums scaled by
        ``2/n``), so that on the same inputs our GPTQ reproduces theirs: at 3 bits per-row a float64
        Hessian, though more precise, flips a few rounding ties and moves perplexity by tens of percent
        either way (benchmarks/RESULTS.md), which would hide any real difference between the two.
        """
        return self.hessian * self.gptq_scale()

    def gptq_scale(self) -> float:
        """The ``2/n`` of ``gptq_hessian``, for ``gptq(h_scale=...)``, which applies it to its one working copy."""
        return 2.0 / max(self.n_tokens, 1)


def target_linears(block: nn.Module, targets: list[str]) -> dict[str, nn.Linear]:
    """Linear layers of a block whose last name component is in ``targets``."""
    return {
        name: m
        for name, m in block.named_modules()
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    }


def _stat_hooks(block: nn.Module, linears: dict[str, nn.Linear], stats: dict[str, InputStats]) -> list:
    """Hooks that feed each linear's input into ``stats``.

    Layers reading the very same tensor (q/k/v, gate/up) share one ``InputStats`` object, so the
    Hessian of a shared input is accumulated once.
    """
    # Keyed by object identity; holding the tensor keeps its id from being reused by a later
    # tensor during the same block forward (an address or id can be recycled once freed).
    seen: dict[int, tuple[torch.Tensor, InputStats]] = {}

    def update(name: str, x: torch.Tensor) -> None:
        if id(x) in seen:
            stats[name] = seen[id(x)][1]
        else:
            stats[name].update(x)
            seen[id(x)] = (x, stats[name])

    hooks = [block.register_forward_pre_hook(lambda *_: seen.clear())]
    hooks += [
        m.register_forward_hook(lambda _m, inp, _out, name=name: update(name, inp[0]))
        for name, m in linears.items()
    ]
    return hooks


class _Stop(Exception):
    pass


def block_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, dict]]:
    """Per batch: the hidden states that reach the first decoder block, and the keyword arguments of each kind of
    block (``families.layer_types``) as the model passes them: a sliding-window block gets another attention mask
    than a full one, and in Gemma 3 another rotary embedding. Each forward runs as far as the first block of the
    last kind (the first block alone where all are of one kind). ``of_kind`` picks one block's arguments."""
    layers, kinds = decoder_layers(model), layer_types(model)
    first = {kind: kinds.index(kind) for kind in dict.fromkeys(kinds)}
    last = max(first.values())
    captured: list[tuple[torch.Tensor, dict]] = []

    def grab(i: int, kind: str):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            if i == 0:
                captured.append(((args[0] if args else kwargs["hidden_states"]).detach(), {}))
            drop = ("hidden_states", "past_key_values", "past_key_value")
            captured[-1][1][kind] = {**{k: v for k, v in kwargs.items() if k not in drop}, "use_cache": False}
            if i == last:
                raise _Stop
        return hook

    handles = [layers[i].register_forward_pre_hook(grab(i, kind), with_kwargs=True) for kind, i in first.items()]
    device = next(model.parameters()).device
    try:
        for b in range(0, len(windows), batch_size):
            try:
                model(windows[b : b + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return captured


def of_kind(batches: list[tuple[torch.Tensor, dict]], kind: str) -> list[tuple[torch.Tensor, dict]]:
    """``(hidden, kwargs)`` per batch for a block of ``kind``, from ``block_inputs``' arguments of every kind."""
    return [(h, kw[kind]) for h, kw in batches]


def block_output(out: torch.Tensor | tuple) -> torch.Tensor:
    """The hidden states of a decoder block's output (a tuple in some transformers versions and models)."""
    return out[0] if isinstance(out, tuple) else out


def _stop_after(block: nn.Module, linears: dict[str, nn.Linear]) -> list:
    """Hooks that abort a block forward once every layer of ``linears`` has run (what follows is not needed)."""
    pending: set[str] = set()

    def done(name: str) -> None:
        pending.discard(name)
        if not pending:
            raise _Stop

    hooks = [block.register_forward_pre_hook(lambda *_: pending.update(linears))]
    hooks += [m.register_forward_hook(lambda *_, name=name: done(name)) for name, m in linears.items()]
    return hooks


class FinalOutputs:
    """Outputs of a block's finished layers, recorded in the first pass after they were quantized and served to
    every later pass of the same block instead of being computed again.

    True-sequential calibration runs each block once per group of layers and once more for its outputs (five
    times for Llama), and every pass recomputes the layers before the group it measures although they are final
    once quantized. A final layer's output is recorded only in a forward where no unfinished layer of the block
    has run before it, so its input, and with it the output, is the same in every later pass bit for bit (the
    blocks are deterministic in eval mode and only the targeted linears change between passes): serving it
    changes no result. With the group passes stopping where the group's input arrives (``_group_stats``), each
    layer's matmuls then run once per batch with its final weights: the passes of a Llama block cost one forward
    of its linears instead of 2.4 (3.4 with every pass run through its group), at the cost of the served outputs'
    memory, which ``budget`` bounds (bytes; layers past it are computed as before). Calls are keyed by (batch,
    call within the batch's forward), so a layer that runs several times, or not at all, in a forward is served
    only what it computed there.
    """

    def __init__(self, block: nn.Module, linears: dict[str, nn.Linear], budget: int):
        self.block, self.budget, self.used = block, budget, 0
        self.targets = list(linears.values())
        self.unfinished = set(self.targets)
        self.outputs: dict[nn.Linear, dict[tuple[int, int], torch.Tensor]] = {}

    def finish(self, linears: dict[str, nn.Linear]) -> None:
        """``linears`` are quantized: final from now on."""
        self.unfinished -= set(linears.values())

    @contextmanager
    def serving(self, last: bool = False) -> Iterator[None]:
        """For one pass over all batches: serve each final layer's recorded outputs, record those not recorded
        yet while the budget lasts. ``last``: no pass follows; each output is freed once served."""
        batch, clean, calls = [-1], [True], {}

        def start(*_: object) -> None:
            batch[0], clean[0] = batch[0] + 1, True
            calls.clear()

        def key(m: nn.Linear) -> tuple[int, int]:
            calls[m] = calls.get(m, -1) + 1
            return batch[0], calls[m]

        def dirty(*_: object) -> None:
            clean[0] = False

        def record(m: nn.Linear, forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
            def run(x: torch.Tensor) -> torch.Tensor:
                k, out = key(m), forward(x)
                size = out.numel() * out.element_size()
                if clean[0] and not last and self.used + size <= self.budget:
                    self.outputs.setdefault(m, {})[k] = out.clone()  # a clone: the block may change ``out`` in place
                    self.used += size
                return out
            return run

        def serve(m: nn.Linear, forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
            kept = self.outputs[m]

            def run(x: torch.Tensor) -> torch.Tensor:
                k = key(m)
                if k not in kept or kept[k].shape[:-1] != x.shape[:-1]:
                    return forward(x)
                return kept.pop(k) if last else kept[k].clone()
            return run

        final = [m for m in self.targets if m not in self.unfinished and (m in self.outputs or self.used < self.budget)]
        hooks = [self.block.register_forward_pre_hook(start)]
        hooks += [m.register_forward_pre_hook(dirty) for m in self.unfinished]
        previous = {m: m.__dict__.get("forward") for m in final}  # an instance forward (accelerate's hooks) stays
        try:
            for m in final:
                m.forward = (serve if m in self.outputs else record)(m, m.forward)
            yield
        finally:
            for m, forward in previous.items():
                if forward is None:
                    del m.forward
                else:
                    m.forward = forward
            for h in hooks:
                h.remove()
            if last:
                self.outputs.clear()


class BlockInputs:
    """Block inputs of all calibration batches: on ``device`` when ``resident``, else in (pinned) CPU memory."""

    def __init__(self, device: torch.device, resident: bool):
        self.device, self.resident = device, resident

    def keep(self, h: torch.Tensor) -> torch.Tensor:
        """``h`` where it waits: on the device, or copied once straight into pinned CPU memory (asynchronously:
        the copy back in ``use`` is queued behind it on the same stream)."""
        if self.resident or self.device.type == "cpu":
            return h.to(self.device)
        if not torch.cuda.is_available():
            return h.to("cpu")
        return torch.empty(h.shape, dtype=h.dtype, pin_memory=True).copy_(h, non_blocking=True)

    def use(self, h: torch.Tensor) -> torch.Tensor:
        return h.to(self.device, non_blocking=True)


def inputs_fit(n_bytes: int, device: torch.device, block_bytes: int, memory: int | None = None) -> bool:
    """Whether block inputs and outputs of ``n_bytes`` each fit on ``device`` beside one block: they take at
    most half of the memory left once the block is there (the rest is for Hessians and GPTQ). ``memory``:
    the device's free memory now unless given (the plan passes its total capacity)."""
    if device.type != "cuda":
        return True
    if memory is None:
        memory, _ = torch.cuda.mem_get_info(device)
    return 2 * n_bytes <= (memory - block_bytes) // 2


def served_budget(n_bytes: int, device: torch.device, block_bytes: int, memory: int | None = None) -> int:
    """Bytes the final layers' outputs may take (``FinalOutputs``): what block inputs and outputs of ``n_bytes``
    each leave of the half of the memory that ``inputs_fit`` gives them. ``memory``: the device's free memory
    now (a GPU) or the memory the OS has available (the CPU) unless given (the plan passes its capacity)."""
    if memory is None:
        memory = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else capacity(device)
    return max(0, (memory - block_bytes) // 2 - 2 * n_bytes)


def _measure(block: nn.Module, batches: list, linears: dict[str, nn.Linear],
             inputs: BlockInputs) -> tuple[dict[str, InputStats], list]:
    """One pass of all batches through ``block``: input statistics of ``linears`` and the block outputs."""
    stats = {name: InputStats(m.in_features, inputs.device) for name, m in linears.items()}
    hooks = _stat_hooks(block, linears, stats)
    try:
        results = [inputs.keep(block_output(block(inputs.use(h), **kw))) for h, kw in batches]
    finally:
        for hk in hooks:
            hk.remove()
    return stats, results


def _group_stats(block: nn.Module, batches: list, group: dict[str, nn.Linear],
                 inputs: BlockInputs) -> dict[str, InputStats]:
    """Input statistics of one group of layers reading the very same tensor (``_input_groups``), shared by them,
    from one pass of all batches in which each forward stops as that tensor arrives at the group: nothing of the
    group or after it is computed (a forward that never reaches the group runs whole and adds nothing)."""
    stats = InputStats(next(iter(group.values())).in_features, inputs.device)

    def take(_m: nn.Module, args: tuple) -> None:
        stats.update(args[0])
        raise _Stop

    hooks = [m.register_forward_pre_hook(take) for m in group.values()]
    try:
        for h, kw in batches:
            try:
                block(inputs.use(h), **kw)
            except _Stop:
                pass
    finally:
        for hk in hooks:
            hk.remove()
    return dict.fromkeys(group, stats)


def _input_groups(block: nn.Module, batch: tuple, linears: dict[str, nn.Linear],
                  inputs: BlockInputs) -> list[list[str]]:
    """Layers grouped by the very tensor they read (q/k/v, o, gate/up, down for Llama), in the order of
    ``linears``, from one forward of one batch that records identities only (no statistics: a Hessian of
    every layer at once would be the stage's peak at 7B)."""
    read: dict[str, int] = {}
    kept: list[torch.Tensor] = []  # holding each input keeps its id from being reused during the forward

    def record(name: str, x: torch.Tensor) -> None:
        read[name] = id(x)
        kept.append(x)

    hooks = [m.register_forward_hook(lambda _m, inp, _out, name=name: record(name, inp[0]))
             for name, m in linears.items()] + _stop_after(block, linears)
    h, kw = batch
    try:
        block(inputs.use(h), **kw)
    except _Stop:
        pass
    finally:
        for hk in hooks:
            hk.remove()
    groups: dict[int, list[str]] = {}
    for name in linears:
        groups.setdefault(read[name], []).append(name)
    return list(groups.values())


@torch.no_grad()
def run_blocks(
    model: nn.Module,
    windows: torch.Tensor,
    targets: list[str],
    on_block: Callable[[int, dict[str, nn.Linear], dict[str, InputStats]], None],
    batch_size: int = 8,
    sequential: bool = True,
    true_sequential: bool = True,
    device: torch.device | str | None = None,
    resident: bool | None = None,
) -> None:
    """Stream calibration windows through the decoder one block at a time.

    ``on_block(i, linears, stats)`` receives targeted linears of block ``i`` (names relative to the
    block) and their input statistics, and may modify them in place. With ``true_sequential`` (and
    ``sequential``) it is called once per group of layers sharing an input, in execution order, and
    each group's statistics are measured after the groups before it were modified (GPTQ's
    "true sequential"): o_proj sees the outputs of quantized q/k/v, down_proj those of gate/up.

    ``device`` (default: the model's): where each block, its inputs and statistics go while it is
    worked on; the block returns to where it was afterwards. ``resident``: keep all block inputs on
    the device (None: when they fit, see ``inputs_fit``).
    """
    layers = decoder_layers(model)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    captured = block_inputs(model, windows, batch_size)
    n_bytes = sum(h.numel() * h.element_size() for h, _ in captured)
    block_bytes = sum(p.numel() * p.element_size() for p in layers[0].parameters())
    inputs = BlockInputs(device, inputs_fit(n_bytes, device, block_bytes) if resident is None else resident)
    budget = served_budget(n_bytes, device, block_bytes) if inputs.resident else 0
    if device != home:
        log.info("calibration on %s, block by block; block inputs (%.2f GiB) %s", device, n_bytes / 2**30,
                 "on the device" if inputs.resident else "in pinned CPU memory")
    batches = [(inputs.keep(h), send_to_device(kw, device, non_blocking=True)) for h, kw in captured]
    del captured
    groups: dict[tuple[str, ...], list[list[str]]] = {}  # block layout (its linears) -> layers sharing an input
    kinds = layer_types(model)
    for i, block in enumerate(tqdm(layers, desc="calibrate+quantize", unit="block")):
        block.to(device)
        mine = of_kind(batches, kinds[i])
        linears = target_linears(block, targets)
        if sequential and true_sequential:
            # which layers share an input, from one batch of the first block of each layout; then each
            # group measured on all batches after the groups before it were modified, its forwards cut
            # short where the group's input arrives and served the outputs of the groups before it
            layout = tuple(linears)
            if layout not in groups:
                groups[layout] = _input_groups(block, mine[0], linears, inputs)
            final = FinalOutputs(block, linears, budget)
            for names in groups[layout]:
                subset = {n: linears[n] for n in names}
                with final.serving():
                    stats = _group_stats(block, mine, subset, inputs)
                on_block(i, subset, stats)
                final.finish(subset)
            log.debug("block %d: %.2f GiB of final layer outputs served to later passes", i, final.used / 2**30)
        else:
            final = FinalOutputs(block, {}, 0)
            stats, outputs = _measure(block, mine, linears, inputs)
            on_block(i, linears, stats)
        if sequential:
            with final.serving(last=True):
                outputs = [inputs.keep(block_output(block(inputs.use(h), **kw))) for h, kw in mine]
        batches = [(o, kw) for o, (_, kw) in zip(outputs, batches)]
        block.to(home)
