"""`train.bf16: auto` on the CPU: bf16 only where it is measured to be faster at the model's shapes.

A CPU flag (AVX512-BF16, AMX) says bf16 runs natively, not that it wins: on an AVX512-BF16 CPU
without AMX some shapes run slower in bf16 than in fp32 (a bf16 CPT at 86 tokens/s where fp32
on another machine ran at 117). So where the flag is there, a short probe times F.linear at the
model's own Linear shapes (each distinct (in, out) once, weighted by how often one forward pass
runs it), the forward matmul x @ W^T and the backward one of a frozen weight (grad_out @ W), at
M = 512 and 2048 rows, in fp32 and in plain bf16 tensors (the kernels autocast and the bf16
frozen weights of factlab.train.precision reach). bf16 is chosen when its FLOP-weighted time
is at least MARGIN times shorter. lm_head is timed at the rows the fused loss gives it per
chunk (factlab.train.loss), not at all M rows at once.

The timings are cached per CPU model, torch version, torch threads and shapes in one JSON file
under the factlab cache (factlab.models.loading.cache_root(), $FACTLAB_CACHE), so the probe
runs once per machine and model; the decision is made again from the cached timings (a new
MARGIN applies). A CPU without the flag never measures: fp32. Delete the file to measure again.

The bench (bench/bench_training.py) measures its MFU peak with the same shapes and timing.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

MARGIN = 1.2
"""bf16 is chosen when its FLOP-weighted matmul time is at least this many times shorter: the
probe's matmuls are not the whole step (norms, attention, the optimizer stay), so a marginal
win in the probe is none in training."""

ROWS = (512, 2048)
"""Rows per matmul in the probe: a small and a typical batch x seq_len of one step."""

SECONDS_PER_TIMING = 0.005
"""Each (shape, rows, pass) is called, fp32 and bf16 in turn, until this long has passed (and
at least 3 times each, after a warm-up); the fastest call counts."""

MIN_WEIGHTS = 1_000_000
"""Models with fewer Linear weights (per forward pass) go by the flag without a probe: at such
sizes a matmul is call overhead, and the tiny test models then train alike in every process
whatever a probe on a busy machine would have said."""

BUSY_SHARE = 0.5
BUSY_AFTER_SECONDS = 0.2
"""A probe that ran longer than this while its process got less than BUSY_SHARE of its torch
threads' CPU time ran on a busy machine: its choice is used but not cached."""

PROBE_VERSION = 1
"""Part of the cache key: a change to what the probe measures measures again."""


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX, and oneDNN agrees);
    elsewhere bf16 is emulated and slower. Native is not always faster: see cpu_bf16_choice."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    try:
        return native and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return native


# ---------------------------------------------------------------------------------------
# The model's matmul shapes, and timing them


class LinearShape(NamedTuple):
    """One distinct matmul shape of a model: `count` Linear modules of (fan_in -> fan_out) per
    forward pass; `head` marks the output embedding (lm_head)."""

    names: str
    fan_in: int
    fan_out: int
    count: int
    head: bool = False


def linear_shapes(model) -> list[LinearShape]:
    """The distinct (in, out) shapes of `model`'s Linear (and GPT-2 Conv1D) modules, in order
    of first appearance, with the module names that have them and how many there are."""
    from transformers.pytorch_utils import Conv1D

    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found: dict[tuple[int, int, bool], list] = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            fan_in, fan_out = m.in_features, m.out_features
        elif isinstance(m, Conv1D):
            fan_in, fan_out = m.weight.shape  # Conv1D stores (in, out)
        else:
            continue
        key = (int(fan_in), int(fan_out), m is out_emb)
        entry = found.setdefault(key, [[], 0])
        short = name.rsplit(".", 1)[-1]
        if short not in entry[0]:
            entry[0].append(short)
        entry[1] += 1
    return [LinearShape(", ".join(names), i, o, n, head) for (i, o, head), (names, n) in found.items()]


def time_linear(fan_in: int, fan_out: int, rows: int, dtypes: tuple[torch.dtype, ...], backward: bool = False,
                min_seconds: float = SECONDS_PER_TIMING, min_calls: int = 3) -> list[float]:
    """Seconds of the fastest call, per dtype, of the forward matmul F.linear(x, W) (x: (rows,
    in), W: (out, in)), or with `backward` of the input gradient of a frozen weight,
    grad_out @ W (grad_out: (rows, out)). After a warm-up the dtypes take turns, call by call,
    until `min_seconds` have passed and each had `min_calls`: another process slowing the
    machine slows them alike, and the fastest call is the one it slowed least."""
    pairs = []
    for dtype in dtypes:
        w = torch.randn(fan_out, fan_in, dtype=dtype)
        pairs.append((torch.randn(rows, fan_out if backward else fan_in, dtype=dtype), w))

    def call(x, w):
        return torch.matmul(x, w) if backward else F.linear(x, w)

    best = [float("inf")] * len(pairs)
    with torch.no_grad():
        for x, w in pairs:
            call(x, w)  # warm-up: oneDNN builds its kernel for the shape here
        n, start = 0, time.perf_counter()
        while n < min_calls or time.perf_counter() - start < min_seconds:
            for i, (x, w) in enumerate(pairs):
                t0 = time.perf_counter()
                call(x, w)
                best[i] = min(best[i], time.perf_counter() - t0)
            n += 1
    return best


def matmul_throughput(shapes: list[LinearShape], rows: int, dtype: torch.dtype,
                      min_seconds: float) -> tuple[dict[str, float], float]:
    """GFLOP/s of the forward matmul per shape at `rows` rows, and of one forward pass's mix
    (total FLOPs / total time, each shape weighted by its count)."""
    per, flops, secs = {}, 0.0, 0.0
    for s in shapes:
        (call,) = time_linear(s.fan_in, s.fan_out, rows, (dtype,), min_seconds=min_seconds)
        f = 2.0 * rows * s.fan_in * s.fan_out
        per[s.names] = f / call / 1e9
        flops += s.count * f
        secs += s.count * call
    return per, flops / secs / 1e9


def head_rows(fan_out: int) -> int:
    """Rows of lm_head per call under the fused loss: one chunk of its logits."""
    from factlab.train.loss import CHUNK_ELEMENTS

    return max(1, CHUNK_ELEMENTS // max(1, fan_out))


# ---------------------------------------------------------------------------------------
# The probe and the decision


def measure(shapes: list[LinearShape], rows: tuple[int, ...] = ROWS,
            min_seconds: float = SECONDS_PER_TIMING) -> list[dict]:
    """One record per (shape, rows, pass): its fp32 and bf16 seconds per call and `weight`,
    the calls of it in one forward (or backward) pass of `rows` rows."""
    records = []
    for m in rows:
        for s in shapes:
            r, weight = m, s.count
            if s.head:  # the fused loss runs lm_head chunk by chunk
                r = min(m, head_rows(s.fan_out))
                weight = s.count * m / r
            for backward in (False, True):
                fp32, bf16 = time_linear(s.fan_in, s.fan_out, r, (torch.float32, torch.bfloat16), backward,
                                         min_seconds)
                records.append({"names": s.names, "fan_in": s.fan_in, "fan_out": s.fan_out, "rows": r, "m": m,
                                "pass": "backward" if backward else "forward", "weight": weight,
                                "fp32": fp32, "bf16": bf16})
    return records


def speedup(records: list[dict], m: int | None = None) -> float:
    """fp32 time / bf16 time of the records (of `m` rows only if given), each weighted by its
    calls per pass: how many times faster bf16 runs the model's matmuls."""
    rs = [r for r in records if m is None or r["m"] == m]
    fp32 = sum(r["weight"] * r["fp32"] for r in rs)
    bf16 = sum(r["weight"] * r["bf16"] for r in rs)
    return fp32 / bf16


def decide(records: list[dict], margin: float = MARGIN) -> tuple[bool, float]:
    """(bf16?, speedup): bf16 when it runs the model's matmuls at least `margin` times faster."""
    x = speedup(records)
    return x >= margin, x


@dataclass
class CpuChoice:
    """`train.bf16: auto` resolved on this CPU, and why (one line)."""

    bf16: bool
    reason: str
    source: str
    """`flag` (no native bf16, or no model to measure), `measured` now, or `cached`."""
    speedup: float | None = None
    cache_file: str | None = None


def cache_file(shapes: list[LinearShape], rows: tuple[int, ...] = ROWS) -> tuple[Path, dict]:
    """(the JSON file of these shapes on this CPU, the key it holds)."""
    from factlab.models.loading import cache_root

    key = {"cpu": cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "shapes": [list(s) for s in shapes], "rows": list(rows), "probe": PROBE_VERSION}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "precision" / f"cpu-bf16-{digest}.json", key


def _read_cache(path: Path, key: dict) -> list[dict] | None:
    """The cached records, or None when the file is missing, unreadable or not for `key`."""
    try:
        data = json.loads(path.read_text())
        records = data["records"]
        if data["key"] != key or not records:
            return None
        speedup(records)  # every record has the fields the decision reads (and a bf16 time > 0)
        return records
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None


def _write_cache(path: Path, key: dict, records: list[dict], **about) -> bool:
    """Write atomically (a reader never sees half a file); False where the cache is not writable."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, **about, "records": records}, indent=1))
        os.replace(tmp, path)
        return True
    except OSError:
        return False


_chosen: dict[str, CpuChoice] = {}
"""Choices made in this process, by cache file: later stages neither read nor measure."""


def cpu_bf16_choice(shapes: list[LinearShape] | None, measure_fn=None) -> CpuChoice:
    """`train.bf16: auto` on this CPU for a model with these Linear shapes (None: by the flag
    alone). No native bf16: fp32 without measuring. A tiny model: bf16 by the flag. Else the
    cached probe of these shapes on this CPU, or a new one (measure_fn: `measure`), cached."""
    if not cpu_has_bf16():
        return CpuChoice(False, "no native bf16 on this CPU (no avx512_bf16 / amx_bf16 flag)", "flag")
    if not shapes:
        return CpuChoice(True, "native bf16 on this CPU (avx512_bf16 / amx_bf16), not measured", "flag")
    if sum(s.count * s.fan_in * s.fan_out for s in shapes) < MIN_WEIGHTS:
        return CpuChoice(True, f"native bf16 on this CPU (avx512_bf16 / amx_bf16); a model under "
                         f"{MIN_WEIGHTS:,} Linear weights is not measured", "flag")
    path, key = cache_file(shapes)
    if str(path) in _chosen:
        return _chosen[str(path)]
    records, source = _read_cache(path, key), "cached"
    if records is None:
        wall, cpu = time.perf_counter(), time.process_time()
        records, source = (measure_fn or measure)(shapes), "measured"
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        share = cpu / max(wall * torch.get_num_threads(), 1e-9)
        if wall > BUSY_AFTER_SECONDS and share < BUSY_SHARE:
            source = (f"measured in {wall:.0f} s while the machine was busy (this process got {100 * share:.0f}% "
                      "of its threads' CPU time): not cached, measured again next run")
        elif not _write_cache(path, key, records, seconds=round(wall, 2), cpu_share=round(share, 2),
                              speedup=round(speedup(records), 3)):
            source = "measured, not cached: the cache folder is not writable"
    bf16, x = decide(records)
    per_m = ", ".join(f"{speedup(records, m):.1f}x at {m} rows" for m in key["rows"])
    where = f"at this model's Linear shapes on {key['cpu']}, {key['threads']} threads ({per_m}); {source}"
    reason = (f"bf16 measured {x:.2f}x fp32 {where}" if bf16 else
              f"bf16 measured {x:.2f}x fp32, under the {MARGIN:g}x it needs, {where}")
    choice = CpuChoice(bf16, reason, "cached" if source == "cached" else "measured", round(x, 3), str(path))
    _chosen[str(path)] = choice
    return choice


_announced: set[str] = set()


def first_time(line: str) -> bool:
    """True the first time this process sees `line`: the stage prints its precision once."""
    if line in _announced:
        return False
    _announced.add(line)
    return True
