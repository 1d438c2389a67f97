"""Training throughput: factlab's CPT stage against the plain transformers + PEFT way.

Both train the same LoRA (r=16 on attention + MLP of SmolLM2-135M) on the same packed blocks
for the same number of optimizer steps, each in its own subprocess (so peak RSS is its own).
What is timed is `Trainer.train()` alone in both (no model loading, no saving, no scoring):
factlab reports it as StageResult.seconds, the plain script times the same call.

The plain way is what a person writes from the transformers/PEFT docs: default
TrainingArguments on CPU (fp32), and the same with `bf16=True` (what a person who knows the
CPU has bf16 would set). factlab chooses bf16 autocast itself from the CPU flags. Modes run
interleaved, `--repeats` times each; the table gives the best and the median.

    python bench/bench_training.py [--steps 12] [--batch 8] [--seq-len 256] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys

WORKER = r'''
import json, resource, sys, time, torch, warnings
warnings.filterwarnings("ignore")
from transformers.utils import logging; logging.set_verbosity_error(); logging.disable_progress_bar()
from factlab.data.corpus import load_documents, pack_documents
from factlab.models.loading import load_model, resolve_model
mode, steps, batch, seq_len = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model, tok = load_model(resolve_model("smollm2-135m"))
docs = load_documents(["examples/data/korrin/docs", "src/factlab/builtin/general.txt"])
blocks = pack_documents(tok, docs * 4, seq_len)
blocks = [b for b in blocks if len(b["input_ids"]) == seq_len]
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
if mode == "factlab":
    import tempfile
    from pathlib import Path
    from factlab.config import StageSpec
    from factlab.train.stage import train_stage
    stage = StageSpec.model_validate({"kind": "cpt", "merge": False, "peft": {"targets": ["attention", "mlp"], "r": 16, "alpha": 32},
                                      "train": {"lr": 1e-4, "max_steps": steps, "batch_size": batch, "seq_len": seq_len}})
    _, res = train_stage(model, tok, stage, "cpt", Path(tempfile.mkdtemp()) / "s", blocks, seed=0)
    seconds, tokens, bf16 = res.seconds, res.train_tokens, res.bf16
else:  # "plain" (fp32) or "plain-bf16"
    import tempfile
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments
    pm = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets, task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_steps=steps,
                             learning_rate=1e-4, use_cpu=True, report_to="none", save_strategy="no",
                             disable_tqdm=True, logging_steps=steps, remove_unused_columns=False, seed=0,
                             bf16=(mode == "plain-bf16"))
    trainer = Trainer(model=pm, args=args, train_dataset=blocks,
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    t0 = time.perf_counter(); trainer.train(); seconds = time.perf_counter() - t0
    tokens, bf16 = steps * batch * seq_len, mode == "plain-bf16"
print(json.dumps({"mode": mode, "seconds": seconds, "tokens": tokens, "tok_s": tokens / seconds, "bf16": bf16,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    import statistics

    import torch

    print(f"machine: {cpu_model()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"LoRA r=16 on attention+MLP of SmolLM2-135M, {a.steps} steps x {a.batch} x {a.seq_len} tokens")
    modes = {"plain": "transformers+PEFT Trainer, fp32", "plain-bf16": "transformers+PEFT Trainer, bf16=True",
             "factlab": "factlab train_stage"}
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for rep in range(a.repeats):
        for mode in modes:
            out = subprocess.run([sys.executable, "-c", WORKER, mode, str(a.steps), str(a.batch), str(a.seq_len)],
                                 capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{mode} failed:\n{out.stderr[-2000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            runs[mode].append(r)
            print(f"  repeat {rep + 1}: {modes[mode]}: {r['seconds']:.1f} s (bf16={r['bf16']})", flush=True)
    print(f"{'method':<40}{'best s':>8}{'median s':>10}{'tok/s':>8}{'peak RSS MB':>13}")
    best = {}
    for mode, label in modes.items():
        secs = [r["seconds"] for r in runs[mode]]
        best[mode] = min(secs)
        tok_s = runs[mode][0]["tokens"] / best[mode]
        rss = max(r["peak_rss_mb"] for r in runs[mode])
        print(f"{label:<40}{best[mode]:>8.1f}{statistics.median(secs):>10.1f}{tok_s:>8.0f}{rss:>13.0f}")
    for ref in ("plain", "plain-bf16"):
        print(f"speed ratio factlab / {ref} (best / best): {best[ref] / best['factlab']:.2f}x")


if __name__ == "__main__":
    main()
