"""Limits an entry point checks from the model's config.json alone, before any weight loads or data is read: a
sequence within the model's positions, and a forward over it within the memory this machine has available.

The memory estimate is of a float32 forward on the CPU (what `load_model` loads by default): the weights, the
full KV cache of every layer, one layer's attention scores and their softmax (attention materialises them one
layer at a time), the MLP activations of one layer and the logits. It leaves out the interpreter, the libraries
and the kernels' temporaries, so it falls below the real peak: what it refuses cannot fit (a length the kernel
would kill the process over), what it lets through may still be tight.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from kvtrain.errors import UserError
from kvtrain.models.shape import ModelShape, check_positions

FLOAT32_BYTES = 4
MEMINFO = "/proc/meminfo"


def available_memory_bytes() -> int | None:
    """The memory the kernel could give this process without swapping (``MemAvailable``), or None when unknown."""
    try:
        with open(MEMINFO) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def forward_peak_bytes(config: PretrainedConfig, n_tokens: int, batch: int = 1) -> dict[str, int]:
    """The parts of the estimated peak memory of a float32 forward over `batch` sequences of `n_tokens`."""
    shape = ModelShape.of(config)
    hidden, vocab = int(config.hidden_size), int(config.vocab_size)
    intermediate = int(getattr(config, "intermediate_size", None) or 4 * hidden)
    q_width, kv_width = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    per_layer = hidden * (2 * q_width + 2 * kv_width) + 3 * hidden * intermediate
    embeddings = vocab * hidden * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    return {
        "weights": FLOAT32_BYTES * (shape.num_layers * per_layer + embeddings),
        "kv cache": FLOAT32_BYTES * 2 * shape.num_layers * kv_width * n_tokens * batch,
        "attention scores": FLOAT32_BYTES * 2 * batch * shape.num_heads * n_tokens * n_tokens,
        "activations": FLOAT32_BYTES * 3 * batch * n_tokens * intermediate,
        "logits": FLOAT32_BYTES * batch * n_tokens * vocab,
    }


def check_sequence(config: PretrainedConfig, n_tokens: int, what: str, *, batch: int = 1) -> None:
    """Refuse `n_tokens` positions (`what` names where they come from) beyond the model's positions, or a forward
    over `batch` such sequences whose estimated peak exceeds the memory available now."""
    check_positions(config, n_tokens, what)
    available = available_memory_bytes()
    if available is None:
        return
    parts = forward_peak_bytes(config, n_tokens, batch)
    total = sum(parts.values())
    if total > available:
        largest = ", ".join(f"{name} {_size(size)}" for name, size in sorted(parts.items(), key=lambda p: -p[1])[:3])
        raise UserError(
            f"{what} = {n_tokens} tokens{f' x batch {batch}' if batch > 1 else ''} needs about {_size(total)} at the "
            f"peak ({largest}), more than the {_size(available)} this machine has available: use shorter sequences "
            "or a smaller batch"
        )


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.0f} MiB"
