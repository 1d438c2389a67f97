"""`device: auto | cpu | cuda | mps`: how it resolves (GPUs faked by monkeypatching torch, there
is none here), the precision a stage then uses, and that models and inputs go where it says."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from factlab.errors import FactlabError
from factlab.models import device as dev
from factlab.train import bf16_probe
from factlab.train import stage as stage_mod
from factlab.train.precision import stage_precision, use_bf16


@pytest.fixture()
def gpus(monkeypatch):
    """Pretend torch sees `n` CUDA GPUs (bf16-capable or not) and/or an MPS device."""
    def fake(n=1, bf16=True, mps=False, macos14=True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
        monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda *a: macos14, raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    return fake


def test_auto_takes_cuda_then_mps_then_the_cpu(gpus):
    gpus(n=1)
    assert dev.resolve_device("auto") == torch.device("cuda", 0)
    gpus(n=0, mps=True)
    assert dev.resolve_device("auto") == torch.device("mps")
    gpus(n=0, mps=False)
    assert dev.resolve_device("auto") == torch.device("cpu")
    gpus(n=1, mps=True)
    assert dev.resolve_device("cpu") == torch.device("cpu")  # asked for: the CPU, GPU or not


def test_a_device_that_is_not_there_is_a_one_line_error(gpus):
    gpus(n=0, mps=False)
    with pytest.raises(FactlabError, match="device: cuda, but torch sees no CUDA GPU"):
        dev.resolve_device("cuda")
    with pytest.raises(FactlabError, match="device: mps, but torch sees no Apple GPU"):
        dev.resolve_device("mps")
    with pytest.raises(FactlabError, match="not one of auto, cpu, cuda, mps"):
        dev.resolve_device("tpu")


def test_each_process_of_a_launch_takes_the_gpu_of_its_local_rank(gpus, monkeypatch):
    gpus(n=4)
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert dev.resolve_device("auto") == torch.device("cuda", 3)
    dev.check_training_device(torch.device("cuda", 3))  # several GPUs are fine under a launch
    monkeypatch.setenv("LOCAL_RANK", "4")
    with pytest.raises(FactlabError, match="local rank 4 has no GPU"):
        dev.resolve_device("cuda")


def test_one_process_never_trains_on_several_gpus_at_once(gpus):
    """The Trainer would wrap the model in DataParallel and multiply the batch."""
    gpus(n=2)
    assert dev.resolve_device("auto") == torch.device("cuda", 0)
    with pytest.raises(FactlabError, match="torch sees 2 GPUs.*CUDA_VISIBLE_DEVICES=0.*accelerate launch"):
        dev.check_training_device(torch.device("cuda", 0))
    gpus(n=1)
    dev.check_training_device(torch.device("cuda", 0))


def test_precision_by_device(gpus, monkeypatch):
    cpu = torch.device("cpu")
    for setting in (True, False, "auto"):  # the CPU path is the one it always was
        assert stage_precision(setting, cpu) == ("bf16" if use_bf16(setting) else "fp32")
    monkeypatch.setattr(bf16_probe, "cpu_has_bf16", lambda: True)
    assert stage_precision("auto", cpu) == "bf16"  # no model to measure: by the flag
    monkeypatch.setattr(bf16_probe, "cpu_has_bf16", lambda: False)
    assert stage_precision("auto", cpu) == "fp32"

    cuda = torch.device("cuda", 0)
    gpus(n=1, bf16=True)
    assert [stage_precision(s, cuda) for s in ("auto", True, False)] == ["bf16", "bf16", "fp32"]
    gpus(n=1, bf16=False)  # e.g. a T4 or V100
    assert [stage_precision(s, cuda) for s in ("auto", False)] == ["fp16", "fp32"]
    with pytest.raises(FactlabError, match="does not compute bf16; set bf16: auto"):
        stage_precision(True, cuda)
    mps = torch.device("mps")
    gpus(n=0, mps=True, macos14=True)
    assert stage_precision("auto", mps) == "bf16"
    gpus(n=0, mps=True, macos14=False)
    assert stage_precision("auto", mps) == "fp16"


def test_training_arguments_follow_the_device(monkeypatch):
    """Training is no longer pinned to the CPU: the Trainer gets use_cpu only for a model on
    the CPU, and bf16 or fp16 autocast as stage_precision said."""
    from factlab.config import TrainSpec

    seen = {}
    monkeypatch.setattr(stage_mod, "TrainingArguments", lambda **kw: seen.update(kw) or kw)
    tr = TrainSpec(batch_size=8)
    for device, precision, expect in [(torch.device("cpu"), "fp32", (True, False, False)),
                                      (torch.device("cpu"), "bf16", (True, True, False)),
                                      (torch.device("cuda", 0), "fp16", (False, False, True)),
                                      (torch.device("cuda", 0), "bf16", (False, True, False)),
                                      (torch.device("mps"), "fp32", (False, False, False))]:
        stage_mod._training_arguments(tr, "ckpt", 0, precision, has_eval=False, device=device, batch_size=4)
        assert (seen["use_cpu"], seen["bf16"], seen["fp16"]) == expect
        assert seen["per_device_train_batch_size"] == 4


def test_load_model_puts_the_model_on_the_device(tiny_dir):
    from factlab.models.loading import load_model

    model, _ = load_model(tiny_dir)
    assert next(model.parameters()).device.type == "cpu"
    model, _ = load_model(tiny_dir, device="meta")  # a device that is not the CPU, with no data
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_a_run_loads_its_model_on_the_resolved_device(tmp_path, tiny_dir, gpus, monkeypatch):
    """auto on a machine with a GPU: the run loads the model there (stopped right after, as
    there is no GPU to compute on here)."""
    import factlab.experiment.runner as runner
    from factlab.config import load_experiment

    class Loaded(Exception):
        pass

    def fake_load(path, dtype=torch.float32, device="cpu"):
        raise Loaded(str(device))

    (tmp_path / "exp.yaml").write_text(yaml.safe_dump({"name": "d", "model": str(tiny_dir), "output_dir": str(tmp_path / "runs")}))
    monkeypatch.setattr(runner, "load_model", fake_load)
    gpus(n=1)
    with pytest.raises(Loaded, match="cuda:0"):
        runner.run_experiment(load_experiment(tmp_path / "exp.yaml"))
    with pytest.raises(Loaded, match="cpu"):
        runner.run_experiment(load_experiment(tmp_path / "exp.yaml", ["device=cpu"]))
    gpus(n=0, mps=False)
    with pytest.raises(FactlabError, match="device: cuda, but torch sees no CUDA GPU"):
        runner.run_experiment(load_experiment(tmp_path / "exp.yaml", ["device=cuda"]))
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_chat_sends_its_prompt_to_the_models_device(tok):
    """The chat turn's input ids go where the model's parameters are (a fake model on the
    meta device records what generate() got)."""
    import io

    from factlab.chat import _turn

    class Fake(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.empty(1, device="meta"))
            self.got = None

        def generate(self, input_ids, attention_mask, **kw):
            self.got = (input_ids.device.type, attention_mask.device.type)
            return torch.cat([torch.zeros_like(input_ids, device="cpu"), torch.tensor([[tok.eos_token_id]])], 1)

    model = Fake()
    _turn(model, tok, [{"role": "user", "content": "Hi"}], temperature=0, max_new_tokens=2, out=io.StringIO())
    assert model.got == ("meta", "meta")


def test_a_cpu_stage_records_its_precision_device_and_processes(tmp_path, tok):
    from factlab.config import StageSpec
    from factlab.data.corpus import pack_documents
    from factlab.testing import tiny_model
    from factlab.train.stage import train_stage

    st = StageSpec.model_validate({"kind": "cpt", "peft": {"targets": ["mlp"], "r": 2},
                                   "train": {"max_steps": 1, "batch_size": 2, "seq_len": 8, "bf16": False}})
    ex = pack_documents(tok, ["Marta Ilvane runs the press line. Jonas Perl leads the night shift."], 8)
    _, res = train_stage(tiny_model("llama", vocab_size=len(tok)), tok, st, "cpt", tmp_path / "s", ex, seed=0)
    saved = json.loads((tmp_path / "s" / "train.json").read_text())
    assert (res.precision, res.device, res.processes) == ("fp32", "cpu", 1)
    assert (saved["precision"], saved["device"], saved["processes"], saved["bf16"]) == ("fp32", "cpu", 1, False)


def test_device_auto_keeps_old_sweep_hashes_and_an_explicit_device_is_a_new_point():
    from factlab.experiment.store import config_hash

    old = {"name": "a", "model": "m", "seed": 0}
    assert config_hash({**old, "device": "auto"}) == config_hash(old)
    assert config_hash({**old, "device": "cuda"}) != config_hash({**old, "device": "cpu"}) != config_hash(old)
