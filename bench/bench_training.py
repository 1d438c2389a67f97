"""Training speed, model FLOPs utilisation and memory: factlab's CPT stage against the plain
transformers + PEFT Trainer, and what each of factlab's training changes contributes.

All rows train the same LoRA (r=16, alpha 32 on q/k/v/o and gate/up/down of every layer of
SmolLM2-135M) on the same packed blocks for the same optimizer steps, each in its own
subprocess (so its peak RSS is its own). What is timed is `Trainer.train()` alone in every
row (factlab reports it as StageResult.seconds; the plain script times the same call).

Rows (one change at a time, top to bottom):
  plain       transformers+PEFT Trainer as the docs show it: default TrainingArguments, fp32
  plain-bf16  the same with bf16=True (autocast): only where factlab's bf16: auto picks bf16
  old         factlab as before issue 14: the model's own loss (fused_loss: false; on bf16
              CPUs also bf16_weights: false, i.e. autocast over fp32 weights)
  fused       + the fused loss (where bf16: auto picks bf16; elsewhere this is the `factlab` row)
  factlab     factlab's defaults: fused loss, and where bf16: auto picks bf16 frozen weights in bf16
  compile     + train.compile: true (regional torch.compile, compile time included)
  micro       + train.micro_batch_size (--micro): the same batches as micro-batches
  anchor      + train.anchor (kl 1, ratio 0.25, 128-token blocks): the KL to the base model on
              general text; its cost is the time it adds (the tokens are the fact tokens)
  demo        the first stage of examples/demo.yaml on its own data (short documents flattened
              into rows, general replay, its LoRA and batch size), --steps steps: tokens/s of
              the workload `make demo` trains, to set against the block row's

Before the rows, the machine's matmul throughput is measured at the model's shapes (the
rows of one forward pass, M = batch x seq_len, times the layer's Linear shapes and lm_head), in
fp32 and bf16; the FLOP-weighted mix of one forward pass is the "peak" of MFU.

MFU = tokens/s x FLOPs per token / measured peak of the row's dtype, with FLOPs per token =
4 x N_frozen + 6 x N_trainable: a frozen matrix costs 2N forward and 2N backward (the gradient
of its input, no weight gradient), a trained one 6N (forward, input and weight gradients).
N counts matmul weights (every Linear, lm_head included; the embedding lookup is not a
matmul); attention scores are left out (under 4% here at seq_len 256).

    python bench/bench_training.py [--steps 12] [--batch 8] [--seq-len 256] [--repeats 2] [--micro 2]
    python bench/bench_training.py --quick     # a tiny random model, seconds: checks the script
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_model

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
"""--quick: the tiny random llama (factlab.testing.tiny_model with these sizes, vocab 400)."""

LABELS = {
    "plain": "transformers+PEFT Trainer, fp32",
    "plain-bf16": "transformers+PEFT Trainer, bf16=True",
    "old": "factlab, model's own loss (old path)",
    "fused": "factlab, fused loss, autocast weights",
    "factlab": "factlab defaults (fused loss{w})",
    "compile": "factlab defaults + compile",
    "micro": "factlab defaults + micro_batch_size {m}",
    "anchor": "factlab defaults + train.anchor (KL, ratio 0.25)",
    "demo": "the demo's CPT stage (examples/demo.yaml)",
}
ANCHOR = {"kl": 1.0, "ratio": 0.25, "seq_len": 128}
"""The `anchor` row's train.anchor: 2 blocks of 128 general-text tokens per batch of 8."""


# ---------------------------------------------------------------------------------------
# Worker: one row, in its own process


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _workload(quick: bool, seq_len: int):
    """(model, tokenizer, blocks of exactly seq_len tokens)."""
    from factlab.data.corpus import load_documents, pack_documents

    docs = load_documents([ROOT / "examples/data/korrin/docs", ROOT / "src/factlab/builtin/general.txt"])
    if quick:
        from factlab.testing import tiny_model, tiny_tokenizer

        tok = tiny_tokenizer()
        model = tiny_model("llama", vocab_size=len(tok), **TINY)
    else:
        from factlab.models.loading import load_model, resolve_model

        model, tok = load_model(resolve_model("smollm2-135m"))
    blocks = [b for b in pack_documents(tok, docs * 4, seq_len) if len(b["input_ids"]) == seq_len]
    return model, tok, blocks


def _matmul_params(model) -> tuple[int, int]:
    """(N_frozen, N_trainable): frozen matmul weights (Linear / Conv1D, each once) and trained parameters."""
    import torch
    from transformers.pytorch_utils import Conv1D

    frozen, seen = 0, set()
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(m, (torch.nn.Linear, Conv1D)) and w is not None and not w.requires_grad and id(w) not in seen:
            seen.add(id(w))
            frozen += w.numel()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return frozen, trainable


def worker(mode: str, a: argparse.Namespace) -> dict:
    rss_start = _rss_mb()
    import tempfile
    import warnings

    import torch  # noqa: F401
    from transformers.utils import logging

    from factlab.train.progress import peak_rss_mb, reset_peak_rss

    warnings.filterwarnings("ignore")
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    rss_import = _rss_mb()
    model, tok, blocks = _workload(a.quick, a.seq_len)
    rss_loaded = _rss_mb()
    out = {"mode": mode, "rss_start_mb": rss_start, "rss_import_mb": rss_import, "rss_loaded_mb": rss_loaded}
    if mode.startswith("plain"):
        from peft import LoraConfig, get_peft_model
        from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

        pm = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM"))
        args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=a.batch, max_steps=a.steps,
                                 learning_rate=1e-4, use_cpu=True, report_to="none", save_strategy="no",
                                 disable_tqdm=True, logging_steps=a.steps, remove_unused_columns=False, seed=0,
                                 bf16=(mode == "plain-bf16"))
        trainer = Trainer(model=pm, args=args, train_dataset=blocks,
                          data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
        own = reset_peak_rss()
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
        out.update(seconds=seconds, tokens=a.steps * a.batch * a.seq_len, bf16=mode == "plain-bf16",
                   train_peak_rss_mb=peak_rss_mb() if own else None, loss_path="model's own", final_loss=None)
        trained = pm
    elif mode == "demo":
        # The demo's own first stage (documents flattened into rows, replay, its LoRA and batch),
        # on the demo's data, for --steps optimizer steps: the workload `make demo` trains.
        from pathlib import Path as P

        from factlab.config import load_experiment
        from factlab.experiment.runner import _stage_inputs
        from factlab.train.data import build_stage_examples, load_stage_data
        from factlab.train.stage import train_stage

        exp = load_experiment(ROOT / "examples/demo.yaml")
        st = exp.stages[0]
        st = st.model_copy(update={"merge": False, "train": st.train.model_copy(update={"max_steps": a.steps})})
        raw = load_stage_data(st, *_stage_inputs(exp, 0), substitute=st.data.substitute or exp.data.substitute)
        examples = build_stage_examples(st, tok, raw, seed=exp.seed)
        trained, res = train_stage(model, tok, st, "cpt", P(tempfile.mkdtemp()) / "s", examples, seed=exp.seed)
        out.update(seconds=res.seconds, tokens=res.train_tokens, bf16=res.bf16, train_peak_rss_mb=res.train_peak_rss_mb,
                   loss_path=res.loss_path, final_loss=None)
    else:
        from pathlib import Path as P

        from factlab.config import StageSpec
        from factlab.train.stage import train_stage

        # packing: blocks, padded batches as the plain Trainer gets them (the default, documents,
        # would lay the 8 blocks end to end in one row: the same loss, 8x the attention).
        train = {"lr": 1e-4, "max_steps": a.steps, "batch_size": a.batch, "seq_len": a.seq_len, "packing": "blocks"}
        train.update({"old": {"fused_loss": False, "bf16_weights": False}, "fused": {"bf16_weights": False},
                      "compile": {"compile": True}, "micro": {"micro_batch_size": a.micro},
                      "anchor": {"anchor": ANCHOR}}.get(mode, {}))
        stage = StageSpec.model_validate({"kind": "cpt", "merge": False, "train": train,
                                          "peft": {"targets": ["attention", "mlp"], "r": 16, "alpha": 32}})
        trained, res = train_stage(model, tok, stage, "cpt", P(tempfile.mkdtemp()) / "s", blocks, seed=0)
        out.update(seconds=res.seconds, tokens=res.train_tokens, bf16=res.bf16, train_peak_rss_mb=res.train_peak_rss_mb,
                   loss_path=res.loss_path, final_loss=res.final_loss)
    out["n_frozen"], out["n_trainable"] = _matmul_params(trained)
    import resource

    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


# ---------------------------------------------------------------------------------------
# Matmul throughput at the model's shapes


def model_shapes(quick: bool):
    """The model's distinct Linear shapes with their counts per forward pass
    (factlab.train.bf16_probe.linear_shapes, the ones `train.bf16: auto` probes), from a
    weightless copy of the model (meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from factlab.train.bf16_probe import linear_shapes

    if quick:
        from factlab.testing import tiny_model

        return linear_shapes(tiny_model("llama", vocab_size=400, **TINY))
    from factlab.models.loading import resolve_model

    with torch.device("meta"):
        return linear_shapes(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model("smollm2-135m"))))


# ---------------------------------------------------------------------------------------
# Driver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (12; --quick 3)")
    ap.add_argument("--batch", type=int, default=None, help="examples per step (8; --quick 4)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per example (256; --quick 64)")
    ap.add_argument("--repeats", type=int, default=None, help="runs of every row, interleaved (2; --quick 1)")
    ap.add_argument("--micro", type=int, default=2, help="micro_batch_size of the `micro` row")
    ap.add_argument("--modes", default=None, help="comma-separated rows (default: all that apply)")
    ap.add_argument("--quick", action="store_true", help="a tiny random model: checks the script in seconds")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    q = a.quick
    a.steps = a.steps or (3 if q else 12)
    a.batch = a.batch or (4 if q else 8)
    a.seq_len = a.seq_len or (64 if q else 256)
    a.repeats = a.repeats or (1 if q else 2)
    if a.worker:
        print(json.dumps(worker(a.worker, a)))
        return

    import torch

    from factlab.train.bf16_probe import cpu_bf16_choice, cpu_has_bf16, matmul_throughput

    shapes = model_shapes(q)
    # What factlab's rows train in (train.bf16: auto): on a native-bf16 CPU the probe at the
    # model's shapes decides; measured here once, the workers find it cached.
    auto = cpu_bf16_choice(shapes)
    auto_bf16 = auto.bf16
    if a.modes:
        modes = a.modes.split(",")
    else:
        modes = ["plain", "plain-bf16", "old", "fused", "factlab", "compile", "micro", "anchor", "demo"]
        if not auto_bf16:  # bf16 is emulated or slower there, and bf16_weights does nothing without bf16
            modes = [m for m in modes if m not in ("plain-bf16", "fused")]
        if q:
            modes = [m for m in modes if m != "compile"]  # compiling takes minutes, the tiny run seconds
    unknown = set(modes) - set(LABELS)
    if unknown:
        sys.exit(f"unknown --modes {sorted(unknown)}; use some of {', '.join(LABELS)}")
    labels = {m: LABELS[m].format(w=", bf16 weights" if auto_bf16 else "", m=a.micro) for m in modes}

    model_name = "tiny random llama (--quick)" if q else "SmolLM2-135M-Instruct"
    print(f"machine: {cpu_model()}, native bf16: {cpu_has_bf16()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"train.bf16: auto -> {'bf16' if auto.bf16 else 'fp32'} ({auto.reason})")
    print(f"workload: LoRA r=16 on attention+MLP of {model_name}, {a.steps} steps x {a.batch} x {a.seq_len} tokens")

    rows = a.batch * a.seq_len
    peak = {}
    print(f"\nmatmul throughput at the model's shapes, M = {rows} rows (GFLOP/s):")
    print(f"  {'shape (in -> out)':<36}{'fp32':>10}{'bf16':>10}")
    per = {}
    for dtype in (torch.float32, torch.bfloat16):
        per[dtype], peak[dtype] = matmul_throughput(shapes, rows, dtype, 0.2 if q else 1.0)
    for name, fan_in, fan_out, count, _ in shapes:
        print(f"  {f'{name} ({fan_in} -> {fan_out}) x{count}':<36}{per[torch.float32][name]:>10.1f}"
              f"{per[torch.bfloat16][name]:>10.1f}")
    print(f"  {'one forward pass (FLOP-weighted)':<36}{peak[torch.float32]:>10.1f}{peak[torch.bfloat16]:>10.1f}\n")

    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for rep in range(a.repeats):
        for mode in modes:
            cmd = [sys.executable, __file__, "--worker", mode, "--steps", str(a.steps), "--batch", str(a.batch),
                   "--seq-len", str(a.seq_len), "--micro", str(a.micro)] + (["--quick"] if q else [])
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                sys.exit(f"{mode} failed:\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            runs[mode].append(r)
            print(f"  repeat {rep + 1}: {labels[mode]}: {r['seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)

    print(f"\n{'row':<46}{'best s':>8}{'med s':>7}{'tok/s':>8}{'MFU':>7}{'RSS MB':>8}{'train MB':>9}  loss path")
    best: dict[str, float] = {}
    tok_s: dict[str, float] = {}
    rss: dict[str, float] = {}
    for mode in modes:
        rs = runs[mode]
        secs = [r["seconds"] for r in rs]
        best[mode] = min(secs)
        r0 = rs[0]
        tok_s[mode] = r0["tokens"] / best[mode]
        flops_per_token = 4 * r0["n_frozen"] + 6 * r0["n_trainable"]
        mfu = tok_s[mode] * flops_per_token / (peak[torch.bfloat16 if r0["bf16"] else torch.float32] * 1e9)
        rss[mode] = max(r["peak_rss_mb"] for r in rs)
        train_mb = max((r["train_peak_rss_mb"] or 0) for r in rs)
        print(f"{labels[mode]:<46}{best[mode]:>8.1f}{statistics.median(secs):>7.1f}{tok_s[mode]:>8.0f}"
              f"{100 * mfu:>6.1f}%{rss[mode]:>8.0f}{train_mb:>9.0f}  {r0['loss_path']}")
    r0 = runs[modes[0]][0]
    print(f"\nFLOPs per token: 4 x {r0['n_frozen']:,} frozen + 6 x {r0['n_trainable']:,} trained matmul weights"
          f" = {4 * r0['n_frozen'] + 6 * r0['n_trainable']:,}")
    losses = {m: runs[m][0]["final_loss"] for m in modes if runs[m][0]["final_loss"] is not None}
    if losses:
        print("final logged loss (same training in every factlab row): "
              + ", ".join(f"{m} {v:.4f}" for m, v in losses.items()))

    print("\nwhat each change contributed (each row against the one it adds to: compile and micro-batches"
          " against factlab's defaults, the others against the row above):")
    for prev, mode in zip(modes, modes[1:]):
        if mode in ("compile", "micro", "anchor", "demo") and "factlab" in best:
            prev = "factlab"
        print(f"  {labels[mode]:<46} speed x{best[prev] / best[mode]:.2f}, peak RSS {rss[mode] - rss[prev]:+.0f} MB")
    if "factlab" in best:
        for ref in ("plain", "plain-bf16"):
            if ref in best:
                print(f"speed ratio factlab defaults / {labels[ref]} (best / best): {best[ref] / best['factlab']:.2f}x")
        if "anchor" in best:
            # The anchor adds work (its blocks' forward and backward, and a base forward), so its
            # cost is the time it adds to the same fact training, not a tokens/s figure.
            print(f"anchor overhead: +{100 * (best['anchor'] / best['factlab'] - 1):.0f}% of the stage's time "
                  "(goal: at most 35%)")
        if "demo" in tok_s:
            print(f"demo-shaped stage: {tok_s['demo']:.0f} tokens/s, {tok_s['demo'] / tok_s['factlab']:.2f}x the "
                  "block row's (goal: within 1.5x, i.e. at least 0.67x)")
        f = runs["factlab"][0]
        print(f"where the factlab stage's RSS goes: interpreter {f['rss_start_mb']:.0f} MB, imports "
              f"+{f['rss_import_mb'] - f['rss_start_mb']:.0f} MB, model load +{f['rss_loaded_mb'] - f['rss_import_mb']:.0f} MB "
              f"(weights are mapped from the file, resident once touched), peak while training "
              f"{f['train_peak_rss_mb'] or float('nan'):.0f} MB, process peak {f['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
