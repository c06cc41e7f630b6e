"""Benchmark the kvtrain Triton kernels on a CUDA GPU; appends rows to benchmarks/kernels/results.csv.

(a) decode: ``decode_attention`` over a dense bf16 cache and a 4-bit TaDA cache vs torch SDPA over the full
    bf16 cache (GQA 32/8 heads, d = 128), reporting achieved GB/s on the bytes each provider must read.
(b) keyset: ``keyset_attention`` forward+backward vs dense causal SDPA at equal S and vs FlexAttention driven
    by a dense keep-set mask, reporting time and the peak memory allocated on top of the inputs.

Usage: python scripts/bench_kernels.py [--contexts 4096 16384 32768 65536] [--batches 1 8 32] [--peak-bw-gbps N]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ("kernel", "provider", "mode", "batch", "context", "dtype", "ms_p50", "ms_p20", "ms_p80", "gbytes_per_s",
           "peak_mem_mb", "gpu_name", "peak_bw_gbps", "date", "commit")
# Peak DRAM bandwidth in GB/s from vendor datasheets, matched as substrings of torch.cuda.get_device_name()
# (first match wins, so the more specific names come first).
PEAK_BANDWIDTH_GBPS = (
    ("H200", 4800.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),
    ("L40S", 864.0),
    ("A10G", 600.0),
    ("RTX 4090", 1008.0),
    ("V100", 900.0),
)
H_Q, H_KV, HEAD_DIM = 32, 8, 128


def peak_bandwidth(gpu_name: str, override: float | None) -> float:
    if override is not None:
        return override
    for key, gbps in PEAK_BANDWIDTH_GBPS:
        if key in gpu_name:
            return gbps
    raise SystemExit(f"no peak bandwidth known for GPU {gpu_name!r}; pass --peak-bw-gbps")


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def measure(fn: Callable[[], object], warmup: int, rep: int) -> tuple[list[float], float]:
    """(p50, p20, p80) milliseconds via triton's do_bench, and the peak MiB allocated above the baseline."""
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    times = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return list(times), peak_mb


class Recorder:
    def __init__(self, path: Path, gpu_name: str, peak_bw: float) -> None:
        self.path, self.gpu_name, self.peak_bw = path, gpu_name, peak_bw
        self.date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.commit = commit()

    def add(self, kernel: str, provider: str, mode: str, batch: int, context: int, dtype: str,
            times: list[float], peak_mb: float, bytes_read: int | None = None) -> None:
        gbps = "" if bytes_read is None else f"{bytes_read / (times[0] * 1e-3) / 1e9:.1f}"
        row = dict(zip(COLUMNS, (kernel, provider, mode, batch, context, dtype, f"{times[0]:.4f}", f"{times[1]:.4f}",
                                 f"{times[2]:.4f}", gbps, f"{peak_mb:.1f}", self.gpu_name, self.peak_bw, self.date,
                                 self.commit)))
        new = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow(row)
        share = f" ({100 * bytes_read / (times[0] * 1e-3) / 1e9 / self.peak_bw:.0f}% of peak)" if bytes_read else ""
        print(f"{kernel:8s} {provider:14s} {mode:8s} b={batch:<3d} ctx={context:<6d} {times[0]:.3f} ms{share} "
              f"peak +{peak_mb:.0f} MiB")


def bench_decode(rec: Recorder, contexts: list[int], batches: list[int], warmup: int, rep: int) -> None:
    from kvtrain.kernels import MeanCentredKV, decode_attention, quantize

    scaling = HEAD_DIM**-0.5
    for context in contexts:
        for batch in batches:
            q = torch.randn(batch, H_Q, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(batch, H_KV, context, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            dense_bytes = 2 * k.numel() * k.element_size()

            sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
                q[:, :, None], k, v, scale=scaling, enable_gqa=True)
            rec.add("decode", "torch_sdpa", "fwd", batch, context, "bf16", *measure(sdpa, warmup, rep), dense_bytes)
            dense = lambda: decode_attention(q, k, v, scaling=scaling)  # noqa: E731
            rec.add("decode", "triton", "fwd", batch, context, "bf16", *measure(dense, warmup, rep), dense_bytes)

            packed = []
            for x in (k, v):
                mean = x.float().mean(dim=1).half()
                packed.append(MeanCentredKV(mean, quantize(mean[:, None].float() - x.float(), 4, HEAD_DIM)))
            packed_bytes = sum(p.deviation.nbytes + p.mean.numel() * p.mean.element_size() for p in packed)
            tada = lambda: decode_attention(q, packed[0], packed[1], scaling=scaling, k_format="tada", v_format="tada")  # noqa: E731
            rec.add("decode", "triton_tada4", "fwd", batch, context, "int4", *measure(tada, warmup, rep), packed_bytes)
            del q, k, v, packed
            torch.cuda.empty_cache()


def _keyset_inputs(seq_len: int, budget: int, interval: int):
    """G-KV-like replay: a causal prefill of half the sequence, then one event every ``interval`` rows, each
    keeping ``budget`` earlier positions. Returns the kernel inputs and the equivalent dense [h_kv, S, S] mask."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, H_Q, seq_len, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, H_KV, seq_len, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    starts = [0, *range(seq_len // 2, seq_len, interval)]
    kept_idx = torch.zeros(len(starts), H_KV, budget, dtype=torch.long, device="cuda")
    kept_bias = torch.full((len(starts), 1, H_KV, budget), float("-inf"), device="cuda")
    mask = torch.zeros(H_KV, seq_len, seq_len, dtype=torch.bool, device="cuda")
    rows = torch.arange(seq_len, device="cuda")
    for e, start in enumerate(starts):
        end = starts[e + 1] if e + 1 < len(starts) else seq_len
        local = (rows[start:end, None] >= rows[None, :]) & (rows[None, :] >= start)
        mask[:, start:end] = local
        if e == 0:
            continue
        chosen = torch.stack([torch.randperm(start, generator=gen, device="cuda")[:budget] for _ in range(H_KV)])
        kept_idx[e, :, : chosen.shape[1]] = chosen
        kept_bias[e, 0, :, : chosen.shape[1]] = 0.0
        for h in range(H_KV):
            mask[h, start:end, chosen[h]] = True
    kept_k = torch.stack([k.detach()[0, h, kept_idx[:, h]] for h in range(H_KV)], dim=1)[:, None].clone().requires_grad_()
    kept_v = torch.stack([v.detach()[0, h, kept_idx[:, h]] for h in range(H_KV)], dim=1)[:, None].clone().requires_grad_()
    return (q, k, v, kept_k, kept_v, kept_bias, starts), mask


def bench_keyset(rec: Recorder, seq_lens: list[int], budget: int, interval: int, warmup: int, rep: int) -> None:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from kvtrain.kernels import keyset_attention

    scaling = HEAD_DIM**-0.5
    flex = torch.compile(flex_attention)
    group = H_Q // H_KV
    for seq_len in seq_lens:
        (q, k, v, kept_k, kept_v, kept_bias, starts), mask = _keyset_inputs(seq_len, budget, interval)
        grad = torch.randn_like(q)

        def fwd_bwd(fn: Callable[[], torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> Callable[[], object]:
            return lambda: torch.autograd.grad(fn(), inputs, grad)

        ours = lambda: keyset_attention(q, k, v, kept_k, kept_v, kept_bias, starts, scaling)  # noqa: E731
        rec.add("keyset", "triton", "fwd+bwd", 1, seq_len, "bf16",
                *measure(fwd_bwd(ours, (q, k, v, kept_k, kept_v)), warmup, rep))
        causal = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            q, k, v, is_causal=True, scale=scaling, enable_gqa=True)
        rec.add("keyset", "sdpa_causal", "fwd+bwd", 1, seq_len, "bf16", *measure(fwd_bwd(causal, (q, k, v)), warmup, rep))
        block_mask = create_block_mask(lambda b, h, qi, ki: mask[h // group, qi, ki], 1, H_Q, seq_len, seq_len, device="cuda")
        masked = lambda: flex(q, k, v, block_mask=block_mask, scale=scaling, enable_gqa=True)  # noqa: E731
        rec.add("keyset", "flex_dense_mask", "fwd+bwd", 1, seq_len, "bf16", *measure(fwd_bwd(masked, (q, k, v)), warmup, rep))
        del q, k, v, kept_k, kept_v, mask, block_mask
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768, 65536])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--keyset-seq-lens", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--budget", type=int, default=2048, help="kept entries per event (keyset)")
    parser.add_argument("--interval", type=int, default=128, help="rows between compression events (keyset)")
    parser.add_argument("--peak-bw-gbps", type=float, default=None, help="override the GPU's peak bandwidth")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--skip-keyset", action="store_true")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "kernels" / "results.csv")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured.",
              file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    gpu_name = torch.cuda.get_device_name()
    rec = Recorder(args.out, gpu_name, peak_bandwidth(gpu_name, args.peak_bw_gbps))
    if not args.skip_decode:
        bench_decode(rec, args.contexts, args.batches, args.warmup, args.rep)
    if not args.skip_keyset:
        bench_keyset(rec, args.keyset_seq_lens, args.budget, args.interval, args.warmup, args.rep)
    print(f"appended to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
