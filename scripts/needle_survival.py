"""Does distillation change what the cache keeps? The retrieval suite's pass-key haystacks are prefilled through
the compressed cache of a distilled checkpoint and of its base model under the same compression; printed: the
share of the pass key's tokens still held after the prefill compression, over layers and KV heads.

    python scripts/needle_survival.py runs/eval-train/gkv runs/eval-train/gkv-tada4
"""

from __future__ import annotations

import argparse

import torch

from kvtrain import CompressedCache, load_compressed, load_model
from kvtrain.eval.suites.retrieval import RetrievalOptions, RetrievalSuite

LENGTHS, DEPTHS = (192, 384), (0.25, 0.75)


def kept_share(model, tokenizer, config, haystack: str, answer: str) -> float:
    """Share of (answer token, layer, KV head) triples held after the haystack's prefill compression."""
    enc = tokenizer(haystack, return_tensors="pt", return_offsets_mapping=True)
    spans = [(s, s + len(answer)) for s in range(len(haystack)) if haystack.startswith(answer, s)]
    columns = [i for i, (a, b) in enumerate(enc["offset_mapping"][0].tolist()) if any(a < e and b > s for s, e in spans)]
    cache = CompressedCache.for_model(model, config, record=True)
    with torch.no_grad():
        model(input_ids=enc["input_ids"], past_key_values=cache, use_cache=True)
    held = total = 0
    for layer_records in cache.records:
        if not layer_records:  # a dense layer, or nothing was compressed
            continue
        kept = layer_records[-1].kept[0]  # [h_kv, k]
        for head in kept:
            held += sum(int(c in set(head.tolist())) for c in columns)
            total += len(columns)
    return held / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base, tokenizer = load_model("smollm2-135m")
    items = [it for it in RetrievalSuite().build_items(tokenizer, RetrievalOptions(lengths=LENGTHS, depths=DEPTHS,
                                                                                  kinds=("passkey",)))]
    print("| checkpoint | item | answer | kept, base | kept, distilled |\n|---|---|---|---|---|")
    for path in args.checkpoints:
        trained, _, config = load_compressed(path)
        for item in items:
            haystack, answer = item.pieces[0][1], item.checks[0].reference
            print(f"| {path} | {item.id} | {answer} | {kept_share(base, tokenizer, config, haystack, answer):.2f} | "
                  f"{kept_share(trained, tokenizer, config, haystack, answer):.2f} |")


if __name__ == "__main__":
    main()
