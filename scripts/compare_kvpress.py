"""Side by side with NVIDIA kvpress: Expected Attention, TOVA and StreamingLLM on identical prompts, layer by layer.

kvpress pins an older transformers, so its side runs in its own virtual environment (`scripts/kvpress_side.py`)
on prompts this script exports. Four steps:

    python scripts/compare_kvpress.py export --work /tmp/kvpress_compare
    /work/venvs/kvpress/bin/python scripts/kvpress_side.py --model ~/.cache/kvtrain/models/smollm2-135m \
        --prompts /tmp/kvpress_compare/prompts.jsonl --out /tmp/kvpress_compare/kvpress.pt
    python scripts/compare_kvpress.py ours --work /tmp/kvpress_compare
    python scripts/compare_kvpress.py report --work /tmp/kvpress_compare --out benchmarks/kvpress

Protocol (both sides): held-out windows of the embedded text, a 1,024-token context compressed once at prefill,
its 64-token real continuation teacher-forced one token at a time; KL(full || compressed) per continuation token
against the full-cache logits of the same model in the same environment. Each of our variants is a scorer
setting run under one of two protocols:

- ``bench``: our loyalty benchmark's (`scripts/bench_loyalty.py`): ``compression_ratio`` (kept = ceil), the
  default protected 4 sinks and 16 recent tokens;
- ``kvpress``: kvpress's: kept = int(n * (1 - ratio)), and only what the press itself forces is protected
  (4 sinks for Expected Attention and StreamingLLM, the last token for TOVA).

Per layer we record each side's scores ``[h_kv, n]`` and kept positions ``[h_kv, k]``; the report gives the
keep-set Jaccard overlap and the Spearman correlation of the scores with kvpress's, per layer and KV head.
`CAUSES` pairs variants that differ in one setting, so each candidate cause of a gap has its own row.

The ``ours`` stage saves after every window and resumes; a second process can take later windows
(``--first-window``) and the report merges both files, using the windows complete in all of them.
The hand-written explanation, ``<out>/why.md``, is appended to ``results.md``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch
from tqdm import tqdm

from kvtrain.config import KVCompressionConfig
from kvtrain.data import load_texts, token_blocks
from kvtrain.eval.loyalty import continuation_metrics
from kvtrain.eval.report import markdown_table, provenance, provenance_lines
from kvtrain.io import atomic_write_bytes, atomic_write_text
from kvtrain.models import load_model
from kvtrain.runtime.cache import CompressedCache
from kvtrain.runtime.decode import teacher_forced_decode
from kvtrain.runtime.replay import replay_compression
from kvtrain.runtime.routing import use_kvtrain_attention

CONTEXT_LEN, CONTINUATION_LEN = 1024, 64
RATIOS = (0.5, 0.75, 0.9)
# What each press forces into the cache whatever its score: (sinks, recent).
KVPRESS_FORCED = {"expected_attention": (4, 0), "tova": (0, 1), "streaming": (4, 0)}


@dataclass(frozen=True)
class Variant:
    """One of our settings: a scorer (name, params), a query window and a protocol ("bench" or "kvpress")."""

    policy: str
    params: tuple[tuple[str, object], ...] = ()
    query_window: int = 16
    protocol: str = "bench"

    def config(self, ratio: float) -> KVCompressionConfig:
        data = {"scorer": {"name": self.policy, "params": dict(self.params)}, "query_window": self.query_window}
        if self.protocol == "bench":
            data.update(budget=None, compression_ratio=ratio)
        else:
            sinks, recent = KVPRESS_FORCED[self.policy]
            data.update(budget=int(CONTEXT_LEN * (1 - ratio)), sinks=sinks, recent=recent)
        return KVCompressionConfig.from_dict(data)


EA_DEFAULT = (("n_sink", 0),)  # our Expected Attention default
EA_KVPRESS = (("n_sink", 4),)  # kvpress's: the first 4 tokens out of the query statistics and the softmax
BENCH_EA_WINDOW = 128  # the query window `scripts/bench_loyalty.py` gives Expected Attention
VARIANTS = {
    # Expected Attention: our benchmark setting, kvpress's, and each one setting changed between them
    "ea: ours": Variant("expected_attention", EA_DEFAULT, BENCH_EA_WINDOW),
    "ea: ours, kvpress protocol": Variant("expected_attention", EA_DEFAULT, BENCH_EA_WINDOW, "kvpress"),
    "ea: kvpress settings, kvpress protocol": Variant("expected_attention", EA_KVPRESS, CONTEXT_LEN, "kvpress"),
    "ea: kvpress settings but n_sink 0, kvpress protocol": Variant(
        "expected_attention", EA_DEFAULT, CONTEXT_LEN, "kvpress"
    ),
    "ea: kvpress settings but 128 queries, kvpress protocol": Variant(
        "expected_attention", EA_KVPRESS, BENCH_EA_WINDOW, "kvpress"
    ),
    "ea: kvpress settings, bench protocol": Variant("expected_attention", EA_KVPRESS, CONTEXT_LEN),
    # TOVA: per KV group (ours) or one set per layer (kvpress), under each protocol
    "tova: ours (per KV group)": Variant("tova", (("heads", "group"),)),
    "tova: per KV group, kvpress protocol": Variant("tova", (("heads", "group"),), protocol="kvpress"),
    "tova: all heads": Variant("tova", (("heads", "all"),)),
    "tova: all heads, kvpress protocol": Variant("tova", (("heads", "all"),), protocol="kvpress"),
    "streaming: ours": Variant("streaming"),
    "streaming: kvpress protocol": Variant("streaming", protocol="kvpress"),
}
# Per policy: our defaults under the bench protocol, the same under kvpress's protocol, and kvpress's settings
# reproduced on our side under kvpress's protocol.
HEADLINE = {
    "expected_attention": ("ea: ours", "ea: ours, kvpress protocol", "ea: kvpress settings, kvpress protocol"),
    "tova": ("tova: ours (per KV group)", "tova: per KV group, kvpress protocol", "tova: all heads, kvpress protocol"),
    "streaming": ("streaming: ours", "streaming: kvpress protocol", "streaming: kvpress protocol"),
}
# Each candidate cause of a gap: two variants that differ in that one setting only.
CAUSES = [
    ("expected_attention", "protocol (recent 16 protected; kept count)", "ea: ours", "ea: ours, kvpress protocol"),
    (
        "expected_attention",
        "protocol, at kvpress's scorer settings",
        "ea: kvpress settings, bench protocol",
        "ea: kvpress settings, kvpress protocol",
    ),
    (
        "expected_attention",
        "n_sink 0 -> 4 (sinks out of the statistics and the softmax)",
        "ea: kvpress settings but n_sink 0, kvpress protocol",
        "ea: kvpress settings, kvpress protocol",
    ),
    (
        "expected_attention",
        "query window 128 -> all 1,024 prompt queries",
        "ea: kvpress settings but 128 queries, kvpress protocol",
        "ea: kvpress settings, kvpress protocol",
    ),
    ("tova", "heads group -> all, bench protocol", "tova: ours (per KV group)", "tova: all heads"),
    (
        "tova",
        "heads group -> all, kvpress protocol",
        "tova: per KV group, kvpress protocol",
        "tova: all heads, kvpress protocol",
    ),
    ("tova", "protocol, per KV group", "tova: ours (per KV group)", "tova: per KV group, kvpress protocol"),
    ("tova", "protocol, all heads", "tova: all heads", "tova: all heads, kvpress protocol"),
    ("streaming", "protocol (kept = ceil vs int)", "streaming: ours", "streaming: kvpress protocol"),
]


# ----------------------------------------------------------------------------------------------- export
def export(work: Path, windows: int) -> None:
    _, tokenizer = load_model("smollm2-135m")
    texts = load_texts(None, split="heldout")
    blocks = token_blocks(tokenizer, texts, CONTEXT_LEN + CONTINUATION_LEN, n_blocks=windows)
    lines = [json.dumps({"window": i, "context_len": CONTEXT_LEN, "ids": row.tolist()}) for i, row in enumerate(blocks)]
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(work / "prompts.jsonl", "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------- our side
def cpu_model() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"



class RecordingScorer:
    """Wraps a layer's scorer to keep the scores of its first event (the prefill), batch row 0."""

    def __init__(self, scorer):
        self.scorer, self.scores = scorer, None

    def __call__(self, inputs, state):
        scores, new_state = self.scorer(inputs, state)
        if self.scores is None:
            self.scores = scores[0].float().cpu()
        return scores, new_state


def recorders_for(compressors) -> list[RecordingScorer]:
    recorders = []
    for compressor in compressors:
        compressor.scorer = RecordingScorer(compressor.scorer)
        recorders.append(compressor.scorer)
    return recorders


def compressed_run(model, config: KVCompressionConfig, ids: torch.Tensor, method: str) -> tuple[torch.Tensor, list]:
    """Logits predicting the continuation, and per layer the scores and kept positions of the prefill event.

    ``cache`` prefills a `CompressedCache` and feeds the continuation one token at a time; ``replay`` computes the
    same logits in one forward (`replay_compression`, equal to step-by-step decoding by the parity tests).
    """
    if method == "cache":
        cache = CompressedCache.for_model(model, config, record=True)
        recorders = recorders_for(layer.compressor for layer in cache.layers)
        logits = teacher_forced_decode(model, cache, ids, prefill_len=CONTEXT_LEN)
        records = cache.records
    else:
        with replay_compression(model, config, prefill_len=CONTEXT_LEN, record=True) as replay:
            recorders = recorders_for(replay.compressors)
            logits = model(input_ids=ids, use_cache=False).logits
        records = replay.records
    layers = [{"scores": rec.scores, "kept": events[0].kept[0].cpu()} for rec, events in zip(recorders, records)]
    return logits[0, CONTEXT_LEN - 1 : -1], layers


def save_torch(obj, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


@torch.no_grad()
def run_ours(work: Path, names: list[str], ratios: list[float], windows: int, method: str, first: int = 0) -> None:
    """Runs every (variant, ratio, window) of windows ``first..windows-1`` not already in its output file, saving
    after each window, so a killed run resumes where it stopped. Runs with different ``first`` write different
    files (``ours_<method>.pt``, ``ours_<method>.from<first>.pt``), so they can share a machine; the report
    merges them."""
    path = work / (f"ours_{method}.pt" if first == 0 else f"ours_{method}.from{first}.pt")
    done = torch.load(path) if path.exists() else None
    runs = done["runs"] if done else {}
    info = done["provenance"] if done else {**provenance(), "cpu": cpu_model(), "method": method}
    versions = {name: version(name) for name in ("kvtrain", "transformers", "torch")}
    model, _ = load_model("smollm2-135m")
    use_kvtrain_attention(model)  # the full-cache reference runs through it too, as in `evaluate_loyalty`
    prompts = [json.loads(line) for line in (work / "prompts.jsonl").read_text().splitlines()][first:windows]
    todo = [(p["window"], n, r) for p in prompts for n in names for r in ratios if (n, r, p["window"]) not in runs]
    with tqdm(total=len(todo), desc="ours") as progress:
        for prompt in prompts:
            window = prompt["window"]
            mine = [(n, r) for w, n, r in todo if w == window]
            if not mine:
                continue
            ids = torch.tensor([prompt["ids"]])
            full = model(input_ids=ids).logits[0, CONTEXT_LEN - 1 : -1]
            for name, ratio in mine:
                comp, layers = compressed_run(model, VARIANTS[name].config(ratio), ids, method)
                per_token = continuation_metrics(full, comp, ids[0, CONTEXT_LEN:])
                runs[(name, ratio, window)] = {**per_token, "layers": layers}
                progress.write(f"window {window} {name} {ratio}: kl {per_token['kl'].mean():.5f}")
                progress.update()
            save_torch({"provenance": info, "versions": versions, "runs": runs}, path)


# ----------------------------------------------------------------------------------------------- report
def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = [x.argsort().argsort().double() for x in (a, b)]
    ranks = [r - r.mean() for r in ranks]
    return float((ranks[0] @ ranks[1]) / (ranks[0].norm() * ranks[1].norm()))


def layer_agreement(ours: dict, theirs: dict, policy: str) -> tuple[float, float]:
    """Mean over KV heads of the keep-set Jaccard overlap and of the Spearman correlation of the scores, leaving
    out the tokens a press forces in (their scores are placeholders on both sides)."""
    sinks, recent = KVPRESS_FORCED[policy]
    n = theirs["scores"].shape[-1]
    free = slice(sinks, n - recent)
    jaccards, correlations = [], []
    for head in range(theirs["kept"].shape[0]):
        a, b = set(ours["kept"][head].tolist()) - {-1}, set(theirs["kept"][head].tolist())
        jaccards.append(len(a & b) / len(a | b))
        if policy != "streaming":  # its scores are positions on our side, 0/1 on kvpress's
            correlations.append(spearman(ours["scores"][head, free], theirs["scores"][head, free]))
    return sum(jaccards) / len(jaccards), (sum(correlations) / len(correlations) if correlations else float("nan"))


def window_kls(runs: dict, name: str, ratio: float, windows: list[int]) -> torch.Tensor:
    """Per window, the mean KL over the continuation tokens."""
    return torch.tensor([float(runs[(name, ratio, w)]["kl"].mean()) for w in windows])


def ratio_range(ratios: torch.Tensor) -> str:
    """Min-max of per-window KL ratios: a difference is real only if the range stays on one side of 1."""
    return f"{float(ratios.min()):.2f}-{float(ratios.max()):.2f}"


def scored(policy: str, correlation: float) -> float | str:
    """StreamingLLM has no scores to correlate (positions on our side, 0/1 on kvpress's): 'n/a', never NaN."""
    return "n/a" if policy == "streaming" else correlation


def variant_rows(runs: dict, kv_runs: dict, windows: list[int], ratios: list[float]) -> tuple[list[dict], list[dict]]:
    """One row per (variant, ratio) against kvpress, and one per (variant, ratio, layer)."""
    rows, layer_rows = [], []
    for name in dict.fromkeys(n for n, _, _ in runs):
        policy = VARIANTS[name].policy
        for ratio in ratios:
            ours, theirs = window_kls(runs, name, ratio, windows), window_kls(kv_runs, policy, ratio, windows)
            pairs = [zip(runs[(name, ratio, w)]["layers"], kv_runs[(policy, ratio, w)]["layers"]) for w in windows]
            agreement = torch.tensor(
                [[layer_agreement(o, t, policy) for o, t in layers] for layers in pairs]
            ).mean(dim=0)  # [layers, (jaccard, spearman)]
            rows.append(
                {
                    "variant": name,
                    "ratio": ratio,
                    "kl": float(ours.mean()),
                    "kl_std": float(ours.std()),
                    "kl / kvpress": float(ours.mean() / theirs.mean()),
                    "per-window ratio": ratio_range(ours / theirs),
                    "windows_lower": f"{int((ours < 0.999 * theirs).sum())}/{len(windows)}",
                    "jaccard": float(agreement[:, 0].mean()),
                    "min_layer_jaccard": float(agreement[:, 0].min()),
                    "spearman": scored(policy, float(agreement[:, 1].mean())),
                }
            )
            layer_rows += [
                {"variant": name, "ratio": ratio, "layer": i, "jaccard": j, "spearman": scored(policy, c)}
                for i, (j, c) in enumerate(agreement.tolist())
            ]
    return rows, layer_rows


HEADLINE_SIDES = ("bench", "kvpress protocol", "kvpress settings")


def headline_rows(runs: dict, kv_runs: dict, windows: list[int], ratios: list[float], agreement: dict) -> list[dict]:
    """Per policy and ratio: kvpress's KL and ours under each `HEADLINE` setting, as a ratio to kvpress's
    (with its per-window range), and our default's keep-set Jaccard and score Spearman against kvpress."""
    rows = []
    for policy, names in HEADLINE.items():
        for ratio in ratios:
            theirs = window_kls(kv_runs, policy, ratio, windows)
            row = {"policy": policy, "ratio": ratio, "kl_kvpress": float(theirs.mean()), "std": float(theirs.std())}
            for side, name in zip(HEADLINE_SIDES, names):
                ours = window_kls(runs, name, ratio, windows)
                row[f"kl_{side}"] = float(ours.mean())
                mean_ratio = float(ours.mean() / theirs.mean())
                row[f"{side} / kvpress (per window)"] = f"{mean_ratio:.3f} ({ratio_range(ours / theirs)})"
            for side, name in zip(HEADLINE_SIDES[:2], names):
                row[f"jaccard {side}"], row[f"spearman {side}"] = agreement[(name, ratio)]
            rows.append(row)
    return rows


def cause_rows(runs: dict, kv_runs: dict, windows: list[int], ratios: list[float]) -> list[dict]:
    """Per candidate cause and ratio: the KL of the two variants that differ in that setting only, each as a
    ratio to kvpress's, and how much of the gap between them the change closes."""
    rows = []
    for policy, cause, before, after in CAUSES:
        for ratio in ratios:
            theirs = window_kls(kv_runs, policy, ratio, windows)
            kls = {side: window_kls(runs, name, ratio, windows) for side, name in (("from", before), ("to", after))}
            rows.append(
                {
                    "policy": policy,
                    "change": cause,
                    "ratio": ratio,
                    "kl_from": float(kls["from"].mean()),
                    "kl_to": float(kls["to"].mean()),
                    "kl_kvpress": float(theirs.mean()),
                    "from / kvpress": float(kls["from"].mean() / theirs.mean()),
                    "to / kvpress": float(kls["to"].mean() / theirs.mean()),
                    "to / from per window": ratio_range(kls["to"] / kls["from"]),
                }
            )
    return rows


def complete_windows(runs: dict) -> list[int]:
    """Windows for which every (variant, ratio) in the run is present: a resumed run may stop mid-window."""
    keys = {(n, r) for n, r, _ in runs}
    return sorted(w for w in {w for _, _, w in runs} if all((n, r, w) in runs for n, r in keys))


def part_windows(part: dict) -> list[int]:
    return sorted({window for _, _, window in part["runs"]})


def report(work: Path, out: Path, method: str) -> None:
    paths = sorted(work.glob(f"ours_{method}*.pt"), key=lambda path: path.name != f"ours_{method}.pt")
    parts = [torch.load(path) for path in paths]
    ours, theirs = parts[0], torch.load(work / "kvpress.pt")
    merged = {key: run for part in parts for key, run in part["runs"].items()}
    windows = complete_windows(merged)  # our run may cover fewer windows than were exported
    runs = {k: v for k, v in merged.items() if k[2] in windows}
    kv_runs = theirs["runs"]
    ratios = sorted({r for _, r, _ in runs})
    causes = cause_rows(runs, kv_runs, windows, ratios)
    rows, layer_rows = variant_rows(runs, kv_runs, windows, ratios)
    agreement = {(row["variant"], row["ratio"]): (row["jaccard"], row["spearman"]) for row in rows}
    headline = headline_rows(runs, kv_runs, windows, ratios, agreement)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.csv", to_csv(headline))
    atomic_write_text(out / "causes.csv", to_csv(causes))
    atomic_write_text(out / "variants.csv", to_csv(rows))
    atomic_write_text(out / "per_layer.csv", to_csv(layer_rows))
    plot(headline, out / "kl.png")
    nll_gap = max(
        float((runs[(n, r, w)]["nll_full"] - kv_runs[(VARIANTS[n].policy, r, w)]["nll_full"]).abs().max())
        for n, r, w in runs
    )
    header = (
        "# kvtrain vs NVIDIA kvpress: Expected Attention, TOVA, StreamingLLM on SmolLM2-135M-Instruct\n\n"
        + provenance_lines(ours["provenance"])
        + "".join(f"- also measured at commit {part['provenance']['commit']} (windows {part_windows(part)})\n"
                  for part in parts[1:])
        + f"- ours: {ours['versions']}\n- kvpress side: {theirs['versions']}\n"
        f"- data: {len(windows)} disjoint held-out windows of the embedded text (windows {windows}); a "
        f"{CONTEXT_LEN}-token context compressed once at prefill, its {CONTINUATION_LEN}-token real continuation "
        "teacher-forced one token at a time; fp32, batch 1\n"
        "- kl = mean over windows of the mean KL(full || compressed) per continuation token (nats), each side "
        f"against its own full-cache logits (the two environments' full-cache NLLs differ by at most {nll_gap:.1e})\n"
        "- std = standard deviation of the per-window KL over the windows; 'per window' = min-max over windows of "
        "the per-window ratio (a difference is real only if that range stays on one side of 1)\n"
        "- protocols: `bench` = our loyalty benchmark's (kept = ceil(n (1 - ratio)); 4 sinks and 16 recent tokens "
        "always kept); `kvpress` = kvpress's (kept = int(n (1 - ratio)); only what the press forces is kept: 4 "
        "sinks for Expected Attention and StreamingLLM, the last token for TOVA)\n\n"
        "Produced by `scripts/compare_kvpress.py` and `scripts/kvpress_side.py` (commands below).\n\n"
    )
    body = (
        "## Ours against kvpress\n\n"
        + "".join(f"- {policy}: " + ", ".join(f"{side} = `{n}`" for side, n in zip(HEADLINE_SIDES, names)) + "\n"
                  for policy, names in HEADLINE.items())
        + "\n"
        + markdown_table(headline)
        + "\n## One setting at a time\n\n"
        "Each row changes one setting between two of our variants (from -> to); `to / from per window` is the "
        "range over windows of the KL ratio.\n\n"
        + markdown_table(causes)
        + "\n## Every variant against kvpress\n\n"
        "jaccard = keep-set overlap with kvpress's, mean over layers, KV heads and windows (min_layer_jaccard: the "
        "worst layer); spearman = rank correlation of the scores with kvpress's over the tokens neither side forces; "
        "windows_lower = windows where our KL is more than 0.1% below kvpress's. Per layer: `per_layer.csv`.\n\n"
        + markdown_table(rows)
    )
    why = out / "why.md"
    atomic_write_text(out / "results.md", header + body + ("\n" + why.read_text() if why.exists() else ""))
    print(header + body)


KVPRESS_STYLE = {"linestyle": "--", "marker": "s", "markersize": 10, "fillstyle": "none"}
PLOT_LINES = (
    ("kvpress", "kvpress"),
    ("bench", "ours, bench protocol"),
    ("kvpress protocol", "ours, kvpress protocol"),
    ("kvpress settings", "ours, kvpress settings"),
)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = list(dict.fromkeys(r["policy"] for r in rows))
    fig, axes = plt.subplots(1, len(policies), figsize=(4 * len(policies), 3.8), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, policy in zip(axes, policies):
        mine = [r for r in rows if r["policy"] == policy]
        ratios = [r["ratio"] for r in mine]
        for side, label in PLOT_LINES:
            style = KVPRESS_STYLE if side == "kvpress" else {"marker": "o"}
            ax.plot(ratios, [r[f"kl_{side}"] for r in mine], label=label, alpha=0.8, **style)
        ax.set_title(policy)
        ax.set_xlabel("fraction of the context evicted")
        ax.set_yscale("log")  # kvpress (hollow squares) lies under "kvpress settings" where they agree
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("KL(full || compressed), nats/token")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def to_csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["export", "ours", "report"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/kvpress_compare"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/kvpress"))
    parser.add_argument("--windows", type=int, default=6)
    parser.add_argument("--first-window", type=int, default=0, help="ours: start at this window (a second process)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    parser.add_argument("--method", choices=["cache", "replay"], default="replay")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.stage == "export":
        export(args.work, args.windows)
    elif args.stage == "ours":
        run_ours(args.work, args.variants, args.ratios, args.windows, args.method, args.first_window)
    else:
        report(args.work, args.out, args.method)


if __name__ == "__main__":
    main()
