"""Benchmark: GRPO under G-KV compression (RL-Sparse) vs full-cache GRPO (RL-Full) on SmolLM2-135M, pass-key task.

    OMP_NUM_THREADS=1 python scripts/bench_grpo.py [--work runs/bench-grpo] [--out benchmarks/grpo]

1. Trains two arms with `train/grpo.py --config recipes/smollm2-135m/grpo/passkey.yaml`: ``sparse`` (rollouts
   sampled through the compressed cache, training on the replay of their keep-sets) and ``full``
   (`--rollout_cache full`: rollouts and training with the full cache), the same number of steps, one process.
2. Evaluates the untrained model and both arms on held-out pass-key items (a seed stream disjoint from training),
   under the recipe's compression and with the full cache: greedy decoding, and sampling at the training
   temperature with several seeds. Scores are the task's checker (`kvtrain.eval.checkers`, as in training).
3. Writes `results.md`, `results.csv` (evaluation), `rewards.csv` (training curves) and `reward_curve.png`.

Noise: each mean comes with a 95% bootstrap interval over the held-out items (sampled modes average the seeds per
item first), every trained-vs-untrained difference with a paired bootstrap interval, and the sampled modes report
the spread between seeds. Every stage is resumable: a finished arm or evaluation is not run again.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kvtrain.io import atomic_write_text  # noqa: E402

RECIPE = REPO / "recipes/smollm2-135m/grpo/passkey.yaml"
ARMS = {"sparse": [], "full": ["--rollout_cache", "full"]}
MODELS = ("base", "sparse", "full")
CACHES = ("compressed", "full")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(REPO / "runs/bench-grpo"), help="arm outputs and cached evaluations")
    parser.add_argument("--out", default=str(REPO / "benchmarks/grpo"), help="where the results are written")
    parser.add_argument("--heldout", type=int, default=64, help="held-out items")
    parser.add_argument("--seeds", type=int, default=3, help="sampling seeds per evaluation")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--max_steps", type=int, default=None, help="override the recipe's max_steps (both arms)")
    return parser.parse_args()


# ------------------------------------------------------------------ state (resumable stages)
class State:
    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str):
        return self.data.get(key)

    def put(self, key: str, value) -> None:
        self.data[key] = value
        atomic_write_text(self.path, json.dumps(self.data, indent=1, sort_keys=True))


def train_arm(arm: str, work: Path, state: State, max_steps: int | None) -> None:
    out = work / arm
    if (out / "kvtrain_training.json").is_file():
        return
    cmd = [sys.executable, str(REPO / "train/grpo.py"), "--config", str(RECIPE), "--output_dir", str(out),
           "--resume", "latest", *ARMS[arm]]
    if max_steps is not None:
        cmd += ["--max_steps", str(max_steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    print(f"[bench_grpo] training arm {arm}: {' '.join(cmd)}", flush=True)
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env)
    spent = (state.get(f"wall/{arm}") or 0.0) + time.time() - start
    state.put(f"wall/{arm}", spent)
    if proc.returncode != 0:
        raise SystemExit(f"arm {arm} failed with exit code {proc.returncode}; rerun to resume it")


# ------------------------------------------------------------------ evaluation
def load(name: str, work: Path):
    from kvtrain.models import load_model
    from kvtrain.runtime.pretrained import load_compressed

    if name == "base":
        model, tokenizer = load_model("smollm2-135m")
    else:
        model, tokenizer, _ = load_compressed(work / name)
    return model.eval(), tokenizer


def recipe_settings():
    from kvtrain.training.grpo.run import parse_args

    task, kv, config, _ = parse_args(["--config", str(RECIPE), "--output_dir", "/tmp/unused", "--bf16", "false",
                                      "--use_cpu", "true"])
    return task, kv.to_config(), config


@torch.no_grad()
def answer(model, tokenizer, prompts: list[str], kv_config, *, sample: bool, seed: int, temperature: float,
           max_new_tokens: int) -> list[str]:
    from kvtrain.models.generation import eos_token_ids
    from kvtrain.runtime.cache import CompressedCache
    from kvtrain.training.trainer import causal_lm

    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    eos = sorted({tokenizer.eos_token_id, *eos_token_ids(model)})  # as TRL stops rollouts
    cache = CompressedCache.for_model(causal_lm(model), kv_config) if kv_config is not None else None
    torch.manual_seed(seed)
    out = model.generate(**batch, past_key_values=cache, max_new_tokens=max_new_tokens, do_sample=sample,
                         temperature=temperature if sample else None, top_k=0 if sample else None,
                         top_p=1.0 if sample else None, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def evaluate(work: Path, state: State, heldout: int, seeds: int) -> None:
    from kvtrain.eval.checkers import run_checker
    from kvtrain.training.grpo.tasks import HELDOUT, task_items

    task, kv_config, config = recipe_settings()
    items = task_items(task.task, heldout, seed=task.task_seed, split=HELDOUT, params=task.task_params())
    runs = [(m, c, "greedy", 0) for m in MODELS for c in CACHES] + [
        (m, c, "sample", s) for m in MODELS for c in CACHES for s in range(seeds)]
    todo = [r for r in runs if state.get(f"eval/{r[0]}/{r[1]}/{r[2]}/{r[3]}") is None]
    loaded = None
    for model_name, cache, mode, seed in tqdm(todo, desc="evaluations"):
        if loaded is None or loaded[0] != model_name:
            loaded = (model_name, *load(model_name, work))
        _, model, tokenizer = loaded
        start = time.time()
        responses = answer(model, tokenizer, [it.prompt for it in items], kv_config if cache == "compressed" else None,
                           sample=mode == "sample", seed=seed, temperature=config.temperature,
                           max_new_tokens=config.max_completion_length)
        scores = [run_checker(it.checker, r, it.reference) for it, r in zip(items, responses)]
        state.put(f"eval/{model_name}/{cache}/{mode}/{seed}",
                  {"scores": scores, "seconds": time.time() - start, "first": responses[:3]})


# ------------------------------------------------------------------ statistics
def per_item(state: State, model: str, cache: str, mode: str, seeds: int) -> torch.Tensor:
    """[items] score of each held-out item: greedy, or the mean over the sampling seeds."""
    n = 1 if mode == "greedy" else seeds
    return torch.tensor([state.get(f"eval/{model}/{cache}/{mode}/{s}")["scores"] for s in range(n)]).mean(dim=0)


def bootstrap(values: torch.Tensor, resamples: int, gen: torch.Generator) -> tuple[float, float]:
    idx = torch.randint(0, values.numel(), (resamples, values.numel()), generator=gen)
    means = values[idx].mean(dim=1)
    return means.quantile(0.025).item(), means.quantile(0.975).item()


def training_curves(work: Path) -> list[dict]:
    rows = []
    for arm in ARMS:
        history = json.loads((work / arm / "kvtrain_training.json").read_text())["metrics"]["log_history"]
        for entry in history:
            if "reward" in entry:
                rows.append({"arm": arm, "step": entry["step"], "reward": entry["reward"],
                             "logp_gap_replay": entry.get("logp_gap/replay"),
                             "logp_gap_full_attention": entry.get("logp_gap/full_attention")})
    return rows


def report(work: Path, out: Path, state: State, seeds: int, resamples: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for model in MODELS:
        for cache in CACHES:
            for mode in ("greedy", "sample"):
                scores = per_item(state, model, cache, mode, seeds)
                low, high = bootstrap(scores, resamples, gen)
                row = {"model": model, "cache": cache, "mode": mode, "mean": scores.mean().item(), "ci_low": low,
                       "ci_high": high, "items": scores.numel(), "seeds": 1 if mode == "greedy" else seeds}
                if mode == "sample":
                    by_seed = [torch.tensor(state.get(f"eval/{model}/{cache}/sample/{s}")["scores"]).mean().item()
                               for s in range(seeds)]
                    row["seed_min"], row["seed_max"] = min(by_seed), max(by_seed)
                if model != "base":
                    diff = scores - per_item(state, "base", cache, mode, seeds)
                    row["delta_vs_base"] = diff.mean().item()
                    row["delta_ci_low"], row["delta_ci_high"] = bootstrap(diff, resamples, gen)
                rows.append(row)
    fields = ["model", "cache", "mode", "mean", "ci_low", "ci_high", "delta_vs_base", "delta_ci_low", "delta_ci_high",
              "seed_min", "seed_max", "items", "seeds"]
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fields)
        writer.writeheader()
        writer.writerows({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows)

    curves = training_curves(work)
    with open(out / "rewards.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["arm", "step", "reward", "logp_gap_replay", "logp_gap_full_attention"])
        writer.writeheader()
        writer.writerows(curves)

    fig, (ax, gap_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for arm, color in (("sparse", "tab:red"), ("full", "tab:blue")):
        points = [(r["step"], r["reward"]) for r in curves if r["arm"] == arm]
        steps, rewards = zip(*points)
        window = 5
        smooth = [sum(rewards[max(0, i - window + 1): i + 1]) / len(rewards[max(0, i - window + 1): i + 1])
                  for i in range(len(rewards))]
        label = "RL-Sparse (G-KV rollouts, replayed)" if arm == "sparse" else "RL-Full (full-cache rollouts)"
        ax.plot(steps, rewards, color=color, alpha=0.25)
        ax.plot(steps, smooth, color=color, label=f"{label}, mean of 5 steps")
    ax.set_xlabel("step")
    ax.set_ylabel("training reward (own rollouts, 8 per step)")
    ax.set_title("GRPO reward curves, SmolLM2-135M, pass key")
    ax.legend(fontsize=8)
    sparse = [r for r in curves if r["arm"] == "sparse"]
    gap_ax.semilogy([r["step"] for r in sparse], [r["logp_gap_full_attention"] for r in sparse], color="tab:gray",
                    label="full-attention training forward")
    gap_ax.semilogy([r["step"] for r in sparse], [r["logp_gap_replay"] for r in sparse], color="tab:red",
                    label="replay of the recorded keep-sets")
    gap_ax.set_xlabel("step")
    gap_ax.set_ylabel("mean |logp_rollout - logp_training|")
    gap_ax.set_title("RL-Sparse: rollout vs training log-probs")
    gap_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "reward_curve.png", dpi=120)

    write_markdown(out, rows, curves, state)


def write_markdown(out: Path, rows: list[dict], curves: list[dict], state: State) -> None:
    task, kv_config, config = recipe_settings()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())

    def fmt(r, key="mean"):
        return f"{r[key]:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"

    def delta(r):
        return "" if "delta_vs_base" not in r else f"{r['delta_vs_base']:+.3f} [{r['delta_ci_low']:+.3f}, {r['delta_ci_high']:+.3f}]"

    names = {"base": "untrained", "sparse": "RL-Sparse", "full": "RL-Full"}
    lines = [
        "# GRPO under compression: RL-Sparse vs RL-Full (SmolLM2-135M, pass key, G-KV budget 64)",
        "",
        f"Machine: {cpu}, {os.cpu_count()} cores shared with other jobs, one thread per process; torch "
        f"{torch.__version__}. Date: {datetime.now(timezone.utc):%Y-%m-%d}. Code: commit {commit} "
        f"(`scripts/bench_grpo.py`, recipe `recipes/smollm2-135m/grpo/passkey.yaml`).",
        "",
        "## Set-up",
        "",
        f"* Task `{task.task}` ({', '.join(task.task_param)}): a 5-digit pass key hidden in filler text, ~90-token chat "
        f"prompts; reward 1 when the first number of the answer is the key (`first_number`). Training items: "
        f"{task.train_items} (seed {task.task_seed}); evaluation: {len(rows and state.get('eval/base/full/greedy/0')['scores'])} "
        "held-out items from a disjoint seed stream.",
        f"* Compression: G-KV (alpha 0.8, lambda 0.5), budget {kv_config.budget} tokens per KV head, "
        f"{kv_config.sinks} sinks, {kv_config.recent} recent, window {kv_config.query_window}, an event after prefill "
        f"and every {kv_config.schedule.interval} decode steps: each {config.max_completion_length}-token answer is "
        "sampled across decode-time evictions.",
        f"* GRPO (TRL): {max(c['step'] for c in curves)} steps of {config.per_device_train_batch_size} completions "
        f"({config.per_device_train_batch_size // config.num_generations} prompts x {config.num_generations}), "
        f"temperature {config.temperature}, LoRA r 16 on q/k/v/o, lr {config.learning_rate}, no KL, one update per "
        "generation. RL-Sparse samples through the compressed cache and trains on the replay of each rollout's "
        "recorded keep-sets; RL-Full samples and trains with the full cache. Both are then evaluated under compression.",
        f"* Wall time (training, one process): RL-Sparse {state.get('wall/sparse') / 60:.0f} min, RL-Full "
        f"{state.get('wall/full') / 60:.0f} min.",
        "",
        "## Held-out reward",
        "",
        "Mean score over the held-out items with a 95% bootstrap interval over items; `vs untrained`: paired "
        "difference to the untrained model on the same items and cache, with its paired bootstrap interval. Sampled "
        f"rows average {rows[1]['seeds']} seeds per item (seed-to-seed range of the mean in the last column).",
        "",
        "| model | cache | decoding | mean [95% CI] | vs untrained [95% CI] | seed range |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        seed_range = f"{r['seed_min']:.3f}-{r['seed_max']:.3f}" if "seed_min" in r else ""
        lines.append(f"| {names[r['model']]} | {r['cache']} | {r['mode']} | {fmt(r)} | {delta(r)} | {seed_range} |")
    sparse = [c for c in curves if c["arm"] == "sparse"]
    replay = [c["logp_gap_replay"] for c in sparse]
    naive = [c["logp_gap_full_attention"] for c in sparse]
    first = {arm: [c["reward"] for c in curves if c["arm"] == arm][:10] for arm in ARMS}
    last = {arm: [c["reward"] for c in curves if c["arm"] == arm][-10:] for arm in ARMS}
    lines += [
        "",
        "## Training curves",
        "",
        "![reward curves and log-prob gaps](reward_curve.png)",
        "",
        "Training reward (each arm on its own rollouts: RL-Sparse's are compressed, RL-Full's are not), mean of the "
        "first and last 10 steps: "
        + "; ".join(f"{names[a]} {sum(first[a]) / len(first[a]):.3f} -> {sum(last[a]) / len(last[a]):.3f}" for a in ARMS)
        + ". Per-step values: `rewards.csv`.",
        "",
        f"Rollout vs training log-probs on RL-Sparse's own rollouts, over all {len(sparse)} steps (mean |logp_rollout - "
        f"logp_training| per completion token): replay of the recorded keep-sets {min(replay):.1e} to {max(replay):.1e}; "
        f"a naive full-attention training forward on the same rollouts {min(naive):.3f} to {max(naive):.3f}.",
        "",
    ]
    atomic_write_text(out / "results.md", "\n".join(lines))


def main() -> None:
    args = parse()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    state = State(work / "state.json")
    for arm in ARMS:
        train_arm(arm, work, state, args.max_steps)
    evaluate(work, state, args.heldout, args.seeds)
    report(work, out, state, args.seeds, args.bootstrap)
    print(f"[bench_grpo] wrote {out / 'results.md'}")


if __name__ == "__main__":
    main()
