"""The kvpress side of `scripts/compare_kvpress.py`: run NVIDIA kvpress presses on exported prompts.

Runs in its own virtual environment (kvpress pins an older transformers than kvtrain), so it imports
nothing from kvtrain. The protocol is the one `compare_kvpress.py` runs on our side: prefill the context
inside ``with press(model)``, then teacher-force the real continuation one token at a time with absolute
position ids (as kvpress's pipeline decodes), and compare with the full-cache logits of the same model.

    /work/venvs/kvpress/bin/python scripts/kvpress_side.py --model ~/.cache/kvtrain/models/smollm2-135m \
        --prompts /tmp/kvpress_compare/prompts.jsonl --out /tmp/kvpress_compare/kvpress.pt

Writes one torch file: for every (policy, ratio, window) the per-token KL(full || compressed), top-1
agreement and NLLs, and per layer the press's scores ``[h_kv, n]`` and kept positions ``[h_kv, k]``.
"""

from __future__ import annotations

import argparse
import json
from importlib.metadata import version
from pathlib import Path

import torch
import torch.nn.functional as F
from kvpress import ExpectedAttentionPress, StreamingLLMPress, TOVAPress
from kvpress.utils import compute_n_kept
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.utils import logging

PRESSES = {"expected_attention": ExpectedAttentionPress, "tova": TOVAPress, "streaming": StreamingLLMPress}


def recording(press, layers: dict[int, dict[str, torch.Tensor]]):
    """Wrap ``press.score`` so that each layer's scores and the top-k that `ScorerPress.compress` keeps are
    recorded (batch row 0)."""
    score = press.score

    def wrapped(module, hidden_states, keys, values, attentions, kwargs):
        scores = score(module, hidden_states, keys, values, attentions, kwargs)
        n_kept = compute_n_kept(keys.shape[2], press.compression_ratio)
        kept = scores.topk(n_kept, dim=-1).indices.sort(dim=-1).values
        layers[module.layer_idx] = {"scores": scores[0].float().cpu(), "kept": kept[0].cpu()}
        return scores

    press.score = wrapped
    return press


@torch.no_grad()
def compressed_logits(model, ids: torch.Tensor, context_len: int, press) -> torch.Tensor:
    """Logits ``[S - context_len, V]`` predicting tokens ``context_len..`` of ``ids`` [1, S]: prefill under the press, then one token at a
    time with absolute positions (the compressed cache is shorter than the positions already seen)."""
    cache = DynamicCache()
    with press(model):
        out = model(input_ids=ids[:, :context_len], past_key_values=cache, logits_to_keep=1)
    logits = [out.logits[:, -1]]
    for t in range(context_len, ids.shape[1] - 1):
        out = model(input_ids=ids[:, t : t + 1], past_key_values=cache, position_ids=torch.tensor([[t]]))
        logits.append(out.logits[:, -1])
    return torch.cat(logits)


def metrics(full: torch.Tensor, comp: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token KL(full || compressed), top-1 agreement and NLLs, as kvtrain's loyalty evaluation computes them."""
    log_full, log_comp = F.log_softmax(full.float(), -1), F.log_softmax(comp.float(), -1)
    return {
        "kl": (log_full.exp() * (log_full - log_comp)).sum(-1),
        "top1": (full.argmax(-1) == comp.argmax(-1)).float(),
        "nll_compressed": -log_comp.gather(-1, targets[:, None])[:, 0],
        "nll_full": -log_full.gather(-1, targets[:, None])[:, 0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--prompts", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    parser.add_argument("--policies", nargs="+", default=list(PRESSES), choices=list(PRESSES))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.disable_progress_bar()

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    prompts = [json.loads(line) for line in args.prompts.read_text().splitlines() if line.strip()]
    runs = {}
    for window, prompt in enumerate(prompts):
        ids, context_len = torch.tensor([prompt["ids"]]), prompt["context_len"]
        with torch.no_grad():
            full = model(input_ids=ids).logits[0, context_len - 1 : -1]
        for policy in args.policies:
            for ratio in args.ratios:
                layers: dict[int, dict[str, torch.Tensor]] = {}
                press = recording(PRESSES[policy](compression_ratio=ratio), layers)
                comp = compressed_logits(model, ids, context_len, press)
                per_token = metrics(full, comp, ids[0, context_len:])
                runs[(policy, ratio, window)] = {**per_token, "layers": [layers[i] for i in sorted(layers)]}
                print(f"window {window} {policy} {ratio}: kl {per_token['kl'].mean():.5f}", flush=True)
    versions = {name: version(name) for name in ("kvpress", "transformers", "torch")}
    torch.save({"versions": versions, "runs": runs}, args.out)


if __name__ == "__main__":
    main()
