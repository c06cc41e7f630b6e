"""Memory and speed: where the cache's bytes go, peak process memory, prefill and decode throughput.

At each context length a held-out prompt is prefilled through the cache and `decode_steps` tokens are decoded
greedily. Reported per length: cache bytes per token seen broken down into codes, scales and zero points,
TaDA means, low-rank coefficients and full-precision (residual) tokens, as a 16-bit model would hold them, and
their fraction of a 16-bit full cache (`kvtrain.eval.cache_bytes`); the bookkeeping bytes (positions,
validity, policy state) beside them; the process's peak resident memory during the run and its rise over the
start; prefill and decode tokens/s, and the same for a transformers `DynamicCache` measured right after, as
a ratio (timings on a shared machine are noisy: compare ratios, not absolute numbers).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

from kvtrain.eval.cache_bytes import cache_bytes
from kvtrain.eval.generation import forward_step, new_cache
from kvtrain.eval.heldout import heldout_paragraphs
from kvtrain.eval.suites.base import Suite, SuiteResult
from kvtrain.runtime.routing import use_kvtrain_attention
from kvtrain.typecheck import check_fields, limits


@dataclass
class MemoryOptions:
    lengths: tuple[int, ...] = field(default=(256, 512), metadata=limits(minimum=2, nonempty=True))
    decode_steps: int = field(default=16, metadata=limits(minimum=1))
    compare_dynamic: bool = True

    def __post_init__(self) -> None:
        check_fields(self)


def _rss_bytes() -> int:
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # no /proc: the lifetime peak is the best available
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Samples the resident set size in a thread while the block runs: `start` and `peak` bytes."""
    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.start = self.peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> "PeakMemory":
        self.start = self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _prompt(tokenizer, length: int):
    import torch


    ids: list[int] = []
    while len(ids) < length:  # repeat the held-out text for lengths beyond it
        ids += tokenizer(" ".join(heldout_paragraphs()), add_special_tokens=False)["input_ids"]
    return torch.tensor([ids[:length]])


def _timed_run(model, config, prompt, steps: int):
    """(prefill seconds, decode seconds per token, cache) of a prefill then `steps` greedy decode steps."""
    import torch


    with torch.no_grad():
        cache = new_cache(model, config, record=False)
        start = time.perf_counter()
        out = forward_step(model, cache, prompt, 0)
        prefill = time.perf_counter() - start
        seen = prompt.shape[1]
        start = time.perf_counter()
        for _ in range(steps):
            out = forward_step(model, cache, out.logits[:, -1:].argmax(-1), seen)
            seen += 1
        decode = (time.perf_counter() - start) / steps
    return prefill, decode, cache


class MemorySuite(Suite):
    name = "memory"
    Options = MemoryOptions

    def longest_sequence(self, options: MemoryOptions) -> tuple[int, str]:
        return max(options.lengths) + options.decode_steps, "max(lengths) + decode_steps"

    def run(self, model, tokenizer, config, options: MemoryOptions, *, progress: bool = False) -> SuiteResult:

        use_kvtrain_attention(model)
        metrics: dict[str, float] = {}
        breakdown = {}
        for length in options.lengths:
            prompt = _prompt(tokenizer, length)
            with PeakMemory() as memory:
                prefill, decode, cache = _timed_run(model, config, prompt, options.decode_steps)
            measured = cache_bytes(cache, model.config)
            del cache
            breakdown[length] = measured.to_dict()
            metrics[f"prefill_tok_s_L{length}"] = length / prefill
            metrics[f"decode_tok_s_L{length}"] = 1.0 / decode
            metrics[f"peak_rss_mib_L{length}"] = memory.peak / 2**20
            metrics[f"rss_rise_mib_L{length}"] = (memory.peak - memory.start) / 2**20
            if options.compare_dynamic and config is not None:
                dyn_prefill, dyn_decode, _ = _timed_run(model, None, prompt, options.decode_steps)
                metrics[f"prefill_speed_vs_dynamic_L{length}"] = dyn_prefill / prefill
                metrics[f"decode_speed_vs_dynamic_L{length}"] = dyn_decode / decode
        metrics.update(breakdown[max(options.lengths)])  # the bytes at the longest length
        return SuiteResult(metrics=metrics, extra={"bytes_by_length": {str(k): v for k, v in breakdown.items()}})
