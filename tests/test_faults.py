"""Faults: bad inputs refused before weights load, a locked run folder, kills, damaged files, a diverging loss."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from gift_quant import pipeline, stages
from gift_quant.checkpoint import CheckpointError
from gift_quant.gift_format import load
from gift_quant.integrity import sha256
from gift_quant.pipeline import recover
from gift_quant.recipe import RecipeError
from gift_quant.rundir import RunError, lock
from gift_quant.sources import SourceError
from gift_quant.train import TrainingError
from gift_quant.verify import verify

from .conftest import crash_at, rewrite_gift, tweak
from .conftest import recipe as full_recipe


def recipe(*args, **kwargs):
    """The tiny recipe, evaluated by perplexity of GIFT-SW only (faults are about stages, not scores)."""
    data = full_recipe(*args, **kwargs).model_dump(mode="json")
    data["eval"].update(tasks=[], baselines=[])
    from gift_quant.recipe_file import parse_recipe

    return parse_recipe(data, "test")

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("change, message", [
    ({"calibration__data": "/nowhere/c4.txt"}, r"calibration.data: '/nowhere/c4.txt': no such file"),
    ({"train__data": "/nowhere/train.txt"}, r"train.data: '/nowhere/train.txt': no such file"),
    ({"eval__ppl_data": "SHORT"}, r"eval.ppl_data = '.*short.txt': \d+ tokens, fewer than one window of 64"),
    ({"model__ref": "nobody/no-such-model"}, r"model.ref = 'nobody/no-such-model': cannot be read \(HF_HUB_OFFLINE"),
    ({"calibration__data": "hf://nobody/no-such-data@train"},
     r"calibration.data: 'hf://nobody/no-such-data@train': cannot be read \(HF_HUB_OFFLINE and HF_DATASETS_OFFLINE"),
    ({"model__trust_remote_code": True}, r"model.trust_remote_code = true .* --trust-remote-code"),
])
def test_bad_inputs_refused_before_weights_load(tiny_folder, tmp_path, no_weights, change, message):
    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    change = {k: (str(short) if v == "SHORT" else v) for k, v in change.items()}
    r = tweak(recipe(tiny_folder, tmp_path / "run"), **{k.replace("__", "."): v for k, v in change.items()})
    with pytest.raises((RecipeError, SourceError), match=message):
        recover(r)
    assert not (tmp_path / "run" / "recipe.json").exists()


def test_recipe_and_override_errors_name_the_place(tmp_path):
    from gift_quant.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  ref: x\n calibration: [\n")
    assert main(["recover", str(bad)]) == 2
    good = tmp_path / "good.yaml"
    good.write_text("model:\n  ref: x\n")
    assert main(["recover", str(good), "--set", "quant.bits=[3"]) == 2
    for data, field in [({"name": "../../x"}, "name"), ({"output_dir": "runs/{nme}"}, "output_dir"),
                        ({"calibration": {"n_samples": True}}, "n_samples")]:
        from gift_quant.recipe_file import parse_recipe

        with pytest.raises(RecipeError, match=field):
            parse_recipe({"model": {"ref": "x"}, **data})
    from gift_quant.recipe_file import parse_recipe

    # the field's dotted path, the value as YAML writes it, the kind in words: no class names, no section dumps
    for data, line in [({"calibration": {"n_samples": True, "seq_len": 64}},
                        "  calibration.n_samples = true: a boolean where a whole number is expected; write a whole number"),
                       ({"train": {"lr": False}}, "  train.lr = false: a boolean where a number is expected"),
                       ({"quant": {"bits": True}}, "  quant.bits = true: a boolean where one of 2, 3, 4, 8 is expected"),
                       ({"calibration": 5}, "  calibration = 5: expected a section: a mapping of its keys")]:
        with pytest.raises(RecipeError) as e:
            parse_recipe({"model": {"ref": "x"}, **data}, "test")
        assert str(e.value).splitlines()[1].startswith(line) and "<class" not in str(e.value), str(e.value)
        assert "seq_len" not in str(e.value)


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    from gift_quant.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  ref: x\n calibration: [\n")
    main(["recover", str(bad)])
    assert f"recipe file {bad} is not valid YAML: line 3, column 2" in capsys.readouterr().err

    def full(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline, "recover", full)
    good = tmp_path / "good.yaml"
    good.write_text("model:\n  ref: x\n")
    assert main(["recover", str(good)]) == 1
    assert capsys.readouterr().err.strip() == "error: [Errno 28] No space left on device"


def test_a_second_run_is_refused_and_a_dead_holder_does_not_block(tiny_folder, tmp_path):
    r = recipe(tiny_folder, tmp_path / "run", ["dense"], steps=2)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom gift_quant.rundir import lock\nfrom tests.conftest import recipe\n"
        f"held = lock(recipe({str(tiny_folder)!r}, {str(tmp_path / 'run')!r}, ['dense'], steps=2).run_dir())\n"
        "print('locked', flush=True)\ntime.sleep(600)")], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunError, match=rf"run folder .* is in use by pid {holder.pid} on "):
            lock(r.run_dir())
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock(r.run_dir()).release()  # the killed holder's lock went with it


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tiny_folder, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = {"n": 0}
    original = stages.train

    def poisoned(model, *a, **k):
        def hook(_m, _i, o):
            calls["n"] += 1
            return o * float("nan") if calls["n"] == 3 else o  # the third training forward diverges

        model.model.norm.register_forward_hook(hook)
        return original(model, *a, **k)

    monkeypatch.setattr(stages, "train", poisoned)
    with pytest.raises(TrainingError, match=r"step 3: the loss is \[nan\] .* last good checkpoint kept: step-2"):
        recover(recipe(tiny_folder, out, ["dense"]))
    kept = load_file(out / "train.work/checkpoints/step-2/model.safetensors")
    assert all(torch.isfinite(t).all() for t in kept.values())
    assert not (out / "train").exists()


def test_gradients_are_clipped(tiny_folder, tmp_path, monkeypatch):
    norms = []
    step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    recover(recipe(tiny_folder, tmp_path / "run", ["dense"], max_grad_norm=1e-3))
    assert norms and max(norms) <= 1e-3 * (1 + 1e-4)


def test_changed_train_section_refused_on_resume_and_damaged_checkpoint_skipped(tiny_folder, tmp_path, caplog):
    out = tmp_path / "run"

    with pytest.raises(KeyboardInterrupt):
        recover(recipe(tiny_folder, out, ["dense"], checkpoint_every=1), on_step=crash_at(3, KeyboardInterrupt()))
    with pytest.raises(RunError, match=r"step-3 was trained from a different recipe .* --from train"):
        recover(recipe(tiny_folder, out, ["dense"], checkpoint_every=1, lr=5e-3))
    assert json.loads((out / "recipe.json").read_text())["train"]["lr"] == 1e-3  # the refused run wrote nothing

    latest = out / "train.work/checkpoints/step-3/model.safetensors"
    latest.write_bytes(latest.read_bytes()[:40])  # truncated
    with caplog.at_level("WARNING", logger="gift_quant.train"):
        recover(recipe(tiny_folder, out, ["dense"], checkpoint_every=1))
    assert "step-3 is damaged" in caplog.text
    assert json.loads((out / "train/manifest.json").read_text())["steps_run"] == 2  # from step 2
    straight = tmp_path / "straight"
    recover(recipe(tiny_folder, straight, ["dense"], checkpoint_every=1))
    a, b = load_file(out / "train/trainable.safetensors"), load_file(straight / "train/trainable.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _load_paths(folder):
    from transformers import AutoModelForCausalLM

    return [lambda: load(folder), lambda: AutoModelForCausalLM.from_pretrained(folder)]


def test_damaged_exports_refused_by_name_on_every_load_path(tiny_folder, tmp_path):
    import shutil

    from gift_quant.cli import main

    out = tmp_path / "run"
    recover(recipe(tiny_folder, out, ["gift"], steps=2))
    good = out / "export/gift"
    layer = "model.layers.0.self_attn.q_proj"

    def case(name, edit=None, raw=None):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        if edit is not None:
            rewrite_gift(folder, edit)
        if raw is not None:
            data = bytearray((folder / "model.safetensors").read_bytes())
            raw(data)
            (folder / "model.safetensors").write_bytes(bytes(data))
        return folder

    def flip(d):
        d[-100] ^= 0xFF

    cases = {
        case("flipped", raw=flip): r"model.safetensors: sha256 differs from the one in config.json",
        case("truncated", raw=lambda d: d.__delitem__(slice(len(d) // 2, None))): r"model.safetensors: sha256 differs",
        case("range", lambda t: t[f"{layer}.salient_idx"].__setitem__(0, 10_000)): rf"{layer}.salient_idx holds column "
                                                                                    r"indices outside 0..63",
        case("repeat", lambda t: t[f"{layer}.salient_idx"].__setitem__(1, int(t[f"{layer}.salient_idx"][0]))):
            rf"{layer}.salient_idx repeats a column",
        case("dtype", lambda t: t.__setitem__(f"{layer}.salient_weight", t[f"{layer}.salient_weight"].float())):
            rf"{layer}.salient_weight is torch.float32, expected torch.float16",
        case("missing", lambda t: t.pop("model.norm.weight")): r"missing tensor model.norm.weight",
    }
    for folder, message in cases.items():
        for load_path in _load_paths(folder):
            with pytest.raises(CheckpointError, match=message):
                load_path()
        assert main(["verify", str(folder)]) == 1
    assert verify(out) == [] and main(["verify", str(out)]) == 0


def test_damaged_stage_files_leftovers_manifests_and_versions(tiny_folder, tmp_path, caplog):
    out = tmp_path / "run"
    r = recipe(tiny_folder, out, ["dense"], steps=2)
    recover(r)
    q = out / "quantize/quantized.safetensors"
    data = bytearray(q.read_bytes())
    data[-10] ^= 0xFF
    q.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"stage 'quantize': .*quantized.safetensors: sha256 differs .*--from quantize"):
        recover(r)
    assert any("quantized.safetensors: sha256 differs" in p for p in verify(out))
    recover(r, from_stage="quantize")

    (out / ".export.tmp-dead").mkdir()
    manifest = out / "evaluate/manifest.json"
    m = json.loads(manifest.read_text())
    m["versions"]["torch"] = "0.0.1"
    manifest.write_text(json.dumps(m))
    with caplog.at_level("INFO", logger="gift_quant"):
        recover(r)
    assert not (out / ".export.tmp-dead").exists() and "left by an interrupted run" in caplog.text
    assert "stage evaluate was run with other package versions" in caplog.text

    manifest.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"evaluate/manifest.json: not valid JSON"):
        recover(r)


def test_kill_9_at_every_stage_then_rerun_is_bit_identical(tiny_folder, tmp_path):
    """A real SIGKILL while quantizing, in a training step, while writing a checkpoint and while exporting;
    after each, a rerun; the final files equal those of an uninterrupted run."""
    def write(out):
        data = recipe(tiny_folder, out, ["dense", "gift"], steps=6, checkpoint_every=1).model_dump(mode="json")
        data["eval"]["tasks"] = []
        path = out.parent / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    def start(path, *extra):
        return subprocess.Popen([sys.executable, "-m", "gift_quant.cli", "recover", str(path), *extra], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})

    out = tmp_path / "killed"
    path = write(out)
    when = {"quantize": lambda: any(out.glob(".quantize.tmp-*")),
            "a training step": lambda: (out / "train.work/train_log.jsonl").exists()
            and (out / "train.work/train_log.jsonl").read_text().count("\n") >= 2,
            "a checkpoint write": lambda: any((out / "train.work/checkpoints").glob(".tmp-*")),
            "export": lambda: any(out.glob(".export.tmp-*"))}
    killed = []
    for moment, ready in when.items():
        # a missed checkpoint window lets that run finish: export is then redone to be interrupted
        proc = start(path, *(["--from", "export"] if moment == "export" else []))
        while proc.poll() is None and not ready():
            time.sleep(0.002)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed.append(moment)
        proc.wait()
    assert start(path).wait() == 0
    assert "quantize" in killed and "export" in killed, killed  # the long windows are always hit

    straight = tmp_path / "straight"
    assert start(write(straight)).wait() == 0
    for rel in ("quantize/quantized.safetensors", "train/trainable.safetensors", "export/gift/model.safetensors",
                "export/dense/model.safetensors"):
        assert sha256(out / rel) == sha256(straight / rel), rel


def test_an_export_copied_away_verifies_on_its_own(tiny_folder, tmp_path):
    """dense, gift and gptq_lora folders carry SHA256SUMS: verify checks any of them after a copy, and catches
    flipped bytes and a deleted tensor (which plain transformers would load silently or re-initialise); our
    loaders of an export refuse the same folder."""
    import shutil

    from safetensors.torch import save_file

    from gift_quant.cli import main
    from gift_quant.exports import load as load_export
    from gift_quant.integrity import SUMS

    out = tmp_path / "run"
    recover(recipe(tiny_folder, out, ["dense", "gift", "gptq_lora"], steps=2))
    for fmt in ("dense", "gift", "gptq_lora"):
        moved = shutil.copytree(out / "export" / fmt, tmp_path / "server" / fmt)
        assert (moved / SUMS).is_file() and verify(moved) == [] and main(["verify", str(moved)]) == 0
        listed = {line.split("  ", 1)[1] for line in (moved / SUMS).read_text().splitlines()}
        assert "model.safetensors" in listed and "config.json" in listed
    assert "adapter/adapter_model.safetensors" in (tmp_path / "server/gptq_lora" / SUMS).read_text()

    dense = tmp_path / "server/dense"
    weights = dense / "model.safetensors"
    good = weights.read_bytes()
    data = bytearray(good)
    data[-100] ^= 0xFF  # one weight changes value; the file still loads
    weights.write_bytes(bytes(data))
    assert any("model.safetensors: sha256 differs" in p for p in verify(dense))
    assert main(["verify", str(dense)]) == 1
    with pytest.raises(CheckpointError, match=r"model.safetensors: sha256 differs .*gift-quant verify"):
        load_export(str(dense))

    weights.write_bytes(good)
    tensors = load_file(weights)
    tensors.pop("model.norm.weight")  # transformers would re-initialise it with one log line
    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert any("model.safetensors: sha256 differs" in p for p in verify(dense))
    (dense / SUMS).write_text("not a sums line\n")
    assert any(f"{SUMS}: line 1 is not" in p for p in verify(dense))


def test_a_damaged_full_precision_folder_is_named_before_weights_load(tiny_folder, tmp_path, no_weights, capsys):
    """A truncated shard, or one whose header lies about a tensor's shape, is one line naming the file (exit 1),
    before anything loads; so is a damaged config.json."""
    import shutil
    import struct

    from gift_quant.cli import main

    cases = {}
    folder = shutil.copytree(tiny_folder, tmp_path / "truncated")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) - 1000])
    cases[folder] = "incomplete metadata"
    folder = shutil.copytree(tiny_folder, tmp_path / "lying")
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [2 * header[name]["shape"][0], *header[name]["shape"][1:]]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :])
    cases[folder] = "invalid shape"
    folder = shutil.copytree(tiny_folder, tmp_path / "config")
    (folder / "config.json").write_text("{broken")
    cases[folder] = "not valid JSON"
    for folder, why in cases.items():
        r = tweak(recipe(tiny_folder, tmp_path / f"run-{folder.name}"), **{"model.ref": str(folder)})
        with pytest.raises(CheckpointError, match=why):
            recover(r)
        path = tmp_path / f"{folder.name}.yaml"
        path.write_text(yaml.safe_dump(r.model_dump(mode="json")))
        capsys.readouterr()
        assert main(["recover", str(path)]) == 1
        last = capsys.readouterr().err.strip().splitlines()[-1]
        culprit = "config.json" if why == "not valid JSON" else "model.safetensors"
        assert last.startswith("error: ") and f"{folder}/{culprit}" in last and "copy the checkpoint again" in last
