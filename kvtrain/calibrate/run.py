"""`calibrate`: one streaming statistics pass (checkpointed, resumable), the TaDA sensitivity pass, the fits.

Resume: every ``checkpoint_every`` blocks the accumulators are written to
``DIR/kv_compression/.calibration_state/accumulators-<blocks>.safetensors`` and then ``progress.json``
(blocks done, data hash, run key, the accumulator file and TaDA rows measured so far) is replaced atomically
to point at it, so a run killed at any moment resumes from the last complete checkpoint. Blocks are always
processed one at a time in the same order and all sums are float64, so a resumed run writes artifacts that
are bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import Tensor
from tqdm.auto import tqdm

from kvtrain.artifacts import calibration as art
from kvtrain.artifacts.head_budgets import HEAD_BUDGETS, write_head_budgets
from kvtrain.artifacts.projections import METHODS, PROJECTIONS, write_projections
from kvtrain.artifacts.quant_plan import CANDIDATE_BITS, QUANT_PLAN, Budget, write_quant_plan
from kvtrain.artifacts.query_stats import QUERY_STATS, save_query_stats
from kvtrain.artifacts.sals_basis import SALS_BASIS, write_sals_basis
from kvtrain.calibrate.fit import (
    RankChoice,
    check_calibration_tokens,
    fit_projections,
    fit_sals_bases,
    kqsvd_spectra,
    o_proj_weights,
)
from kvtrain.calibrate.head_budgets import head_budgets
from kvtrain.calibrate.sensitivity import tada_sensitivity
from kvtrain.calibrate.statistics import StatisticsCollector
from kvtrain.data import load_texts, token_blocks
from kvtrain.errors import UserError
from kvtrain.io import (
    CorruptFileError,
    atomic_write_bytes,
    read_checked_json,
    sha256_bytes,
    sha256_of_file,
    write_checked_json,
)
from kvtrain.models.rope import model_rope
from kvtrain.models.limits import check_sequence
from kvtrain.models.shape import ModelShape, model_fingerprint
from kvtrain.quant import plan_bits
from kvtrain.runtime.routing import observe_attention
from kvtrain.typecheck import check_fields, limits

FITS = ("kqsvd", "query-stats", "head-budgets", "tada", "sals")
# SALS is a cache mode of its own (instead of KQ-SVD keys), so its basis is fitted only when asked for.
DEFAULT_FITS = ("kqsvd", "query-stats", "head-budgets", "tada")
STATE_DIR = ".calibration_state"
PROGRESS = "progress.json"
# Which statistics each fit needs from the streaming pass (tada has its own pass).
_GROUPS = {"kqsvd": "grams", "query-stats": "query_stats", "head-budgets": "head_behaviour", "sals": "sals_grams"}


@dataclass(frozen=True)
class CalibrationSettings:
    """Every hyperparameter of a calibration run (all recorded in ``config.json``)."""

    num_blocks: int = field(default=16, metadata=limits(minimum=1))
    block_len: int = field(default=512, metadata=limits(minimum=1))
    method: str = field(default="kqsvd", metadata=limits(choices=METHODS))
    # uniform key rank; else rank_budget; else energy_eps
    rank: int | None = field(default=None, metadata=limits(minimum=1))
    # total key rank over layers (global allocator)
    rank_budget: int | None = field(default=None, metadata=limits(minimum=1))
    energy_eps: float = 0.1
    value_rank: int | None = field(default=None, metadata=limits(minimum=1))
    value_rank_budget: int | None = field(default=None, metadata=limits(minimum=1))
    # leading tokens of each block left out of the query statistics
    n_sink: int = field(default=4, metadata=limits(minimum=0))
    # mean tokens per layer the head budgets redistribute
    head_budget: int = field(default=512, metadata=limits(minimum=1))
    # every layer keeps at least this fraction of head_budget
    head_floor: float = field(default=0.25, metadata=limits(minimum=0.0, maximum=1.0))
    # importance = beta * copy + (1 - beta) * spread
    head_beta: float = field(default=0.5, metadata=limits(minimum=0.0, maximum=1.0))
    # spread is averaged over every k-th query (t = k, 2k, ...)
    head_entropy_stride: int = field(default=4, metadata=limits(minimum=1))
    # average bits over layers (at least the fewest bits a layer can have)
    tada_budget: float = field(default=4.0, metadata=limits(minimum=min(CANDIDATE_BITS)))
    tada_blocks: int = field(default=2, metadata=limits(minimum=1))  # calibration blocks of the sensitivity pass
    tada_group_size: int = field(default=32, metadata=limits(minimum=1))
    tada_residual_length: int = field(default=128, metadata=limits(minimum=0))
    checkpoint_every: int = field(default=4, metadata=limits(minimum=1))

    def __post_init__(self) -> None:
        check_fields(self)
        if self.tada_blocks > self.num_blocks:
            raise ValueError(f"tada_blocks={self.tada_blocks} exceeds num_blocks={self.num_blocks}")
        self.key_choice(), self.value_choice()

    def check_model(self, config, fits: tuple[str, ...]) -> None:
        """What only the model's config.json decides (before any weight or text loads): the blocks within its
        positions and memory, TaDA groups dividing its head dimension, explicit ranks within it."""
        check_sequence(config, self.block_len, "block_len (--block-len)")
        shape = ModelShape.of(config)
        if "tada" in fits and shape.head_dim % self.tada_group_size:
            raise UserError(f"tada_group_size={self.tada_group_size} (--tada-group-size): must divide the model's "
                            f"head dimension, {shape.head_dim}")
        if "kqsvd" not in fits:
            return
        for name in ("rank", "value_rank"):
            rank = getattr(self, name)
            if rank is not None and rank > shape.head_dim:
                raise UserError(f"{name}={rank} (--{name.replace('_', '-')}): a rank per KV head is at most the "
                                f"model's head dimension, {shape.head_dim}")
        for name in ("rank_budget", "value_rank_budget"):
            budget = getattr(self, name)
            if budget is not None and not shape.num_layers <= budget <= shape.num_layers * shape.head_dim:
                raise UserError(f"{name}={budget} (--{name.replace('_', '-')}): a total over the "
                                f"{shape.num_layers} layers in [{shape.num_layers}, {shape.num_layers * shape.head_dim}] "
                                f"(one to head_dim={shape.head_dim} per layer)")

    def key_choice(self) -> RankChoice:
        return RankChoice(self.rank, self.rank_budget, self.energy_eps)

    def value_choice(self) -> RankChoice:
        return RankChoice(self.value_rank, self.value_rank_budget, self.energy_eps)


def token_hash(blocks: Tensor) -> str:
    """sha256 of the token ids as little-endian int64 in block order."""
    return hashlib.sha256(blocks.to(torch.int64).contiguous().numpy().astype("<i8").tobytes()).hexdigest()


def _check_fits(fit: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    fit = tuple(fit)
    unknown = sorted(set(fit) - set(FITS))
    if unknown or not fit:
        raise ValueError(f"fit={list(fit)}: choose a non-empty subset of {list(FITS)}")
    return tuple(f for f in FITS if f in fit)


class _State:
    """The checkpoint folder of one run; ``key`` identifies what it was written for."""

    def __init__(self, folder: Path, key: dict[str, Any]) -> None:
        self.folder, self.key = folder, key

    def load(self) -> dict[str, Any] | None:
        path = self.folder / PROGRESS
        if not path.is_file():
            return None
        try:
            progress = read_checked_json(path, "calibration progress file")
            accumulators = progress.get("accumulators")
            if accumulators and sha256_of_file(self.folder / accumulators) != progress.get("accumulators_sha256"):
                raise CorruptFileError(f"{self.folder / accumulators}: does not match the sha256 its progress file "
                                       "recorded (damaged or modified since it was written)")
        except (CorruptFileError, FileNotFoundError) as err:
            raise UserError(f"{err}; delete {self.folder}, or run with --no-resume (resume=False in Python) to start "
                            "over") from None
        for field, value in self.key.items():
            if progress.get("key", {}).get(field) != value:
                raise UserError(
                    f"{path}: the checkpoint was written for a different {field} "
                    f"({progress.get('key', {}).get(field)!r}, now {value!r}); run with --no-resume (resume=False in "
                    "Python) to start over"
                )
        return progress

    def save(self, previous: dict[str, Any] | None, blocks_done: int, tensors: dict[str, Tensor] | None = None,
             tada_rows: list[dict[int, float]] | None = None) -> dict[str, Any]:
        """Checkpoint; ``tensors`` / ``tada_rows`` left None keep what ``previous`` recorded."""
        previous = previous or {}
        accumulators = previous.get("accumulators")
        digest = previous.get("accumulators_sha256")
        if tensors is not None:
            accumulators = f"accumulators-{blocks_done:06d}.safetensors"
            data = save(tensors)
            atomic_write_bytes(self.folder / accumulators, data)
            digest = sha256_bytes(data)
        rows = previous.get("tada_rows", []) if tada_rows is None else [
            {str(b): v for b, v in row.items()} for row in tada_rows
        ]
        progress = {"key": self.key, "blocks_done": blocks_done, "accumulators": accumulators,
                    "accumulators_sha256": digest, "tada_rows": rows}
        write_checked_json(self.folder / PROGRESS, progress)
        for stale in self.folder.glob("accumulators-*.safetensors"):
            if stale.name != accumulators:
                stale.unlink()
        return progress


@torch.no_grad()
def _statistics_pass(model, collector: StatisticsCollector, blocks: Tensor, state: _State,
                     progress_state: dict[str, Any] | None, every: int, progress: bool) -> dict[str, Any] | None:
    start = 0
    if progress_state and progress_state.get("accumulators"):
        collector.load_state_dict(load_file(str(state.folder / progress_state["accumulators"])))
        start = progress_state["blocks_done"]
    base = model.model  # the decoder stack: calibration needs no logits
    bar = tqdm(total=len(blocks), initial=start, desc="calibration statistics", unit="block", disable=not progress)
    with observe_attention(model, collector.observe):
        for i in range(start, len(blocks)):
            collector.start_block(blocks[i])
            base(input_ids=blocks[i][None])
            bar.update(1)
            if (i + 1) % every == 0 and i + 1 < len(blocks):
                progress_state = state.save(progress_state, i + 1, collector.state_dict())
    bar.close()
    if start == len(blocks):
        return progress_state
    return state.save(progress_state, len(blocks), collector.state_dict())


def calibrate(
    model,
    tokenizer,
    *,
    out_dir: str | Path,
    data: str | None = None,
    split: str = "train",
    fit: tuple[str, ...] | list[str] = DEFAULT_FITS,
    resume: bool = True,
    progress: bool = True,
    settings: CalibrationSettings | None = None,
    **overrides: Any,
) -> Path:
    """Calibrate ``model`` on ``data`` and write the artifacts; returns ``out_dir/kv_compression``.

    ``data``/``split`` are passed to `kvtrain.data.load_texts` (None: the embedded text) and cut into
    ``num_blocks`` blocks of ``block_len`` tokens. ``overrides`` are `CalibrationSettings` fields
    (``num_blocks=16, block_len=512, rank=..., rank_budget=..., energy_eps=..., tada_budget=...``).
    ``fit`` chooses among ``kqsvd`` (projections.safetensors with ``method``), ``query-stats``,
    ``head-budgets``, ``tada`` (quant_plan.json) and ``sals`` (sals_basis.safetensors, not in the default).
    """
    settings = CalibrationSettings(**{**asdict(settings or CalibrationSettings()), **overrides})
    fits = _check_fits(fit)
    settings.check_model(model.config, fits)
    shape = ModelShape.of(model)
    folder = Path(out_dir) / art.ARTIFACT_DIR
    blocks = token_blocks(tokenizer, load_texts(data, split), settings.block_len, settings.num_blocks)
    num_tokens = blocks.numel()
    if "kqsvd" in fits:
        check_calibration_tokens(num_tokens, {"key": settings.key_choice(), "value": settings.value_choice()})
    fingerprint = model_fingerprint(model.config)
    data_hash = token_hash(blocks)
    state = _State(folder / STATE_DIR, {
        "model_fingerprint": fingerprint["hash"],
        "token_ids_sha256": data_hash,
        "groups": sorted(_GROUPS[f] for f in fits if f in _GROUPS),
        "n_sink": settings.n_sink,
        "head_entropy_stride": settings.head_entropy_stride,
        "tada": [settings.tada_blocks, settings.tada_group_size] if "tada" in fits else None,
    })
    if not resume and state.folder.exists():
        shutil.rmtree(state.folder)
    state.folder.mkdir(parents=True, exist_ok=True)
    progress_state = state.load()

    collector = StatisticsCollector(shape, tuple(_GROUPS[f] for f in fits if f in _GROUPS), settings.n_sink,
                                    settings.head_entropy_stride, model_rope(model, dtype=torch.float32))
    if collector.groups:
        progress_state = _statistics_pass(model, collector, blocks, state, progress_state,
                                          settings.checkpoint_every, progress)
    tada_rows: list[dict[int, float]] = []
    if "tada" in fits:
        done = [{int(b): v for b, v in row.items()} for row in (progress_state or {}).get("tada_rows", [])]
        tada_rows = tada_sensitivity(
            model, blocks[: settings.tada_blocks], settings.tada_group_size, done=done, progress=progress,
            on_layer=lambda rows: state.save(progress_state, len(blocks), tada_rows=rows),
        )

    results = _write_fits(model, folder, fits, settings, shape, collector, tada_rows, fingerprint)
    config = {
        "kind": art.KIND,
        "schema_version": art.SCHEMA_VERSION,
        "model_fingerprint": fingerprint,
        "data": {"source": data or "embedded", "split": split, "num_blocks": int(blocks.shape[0]),
                 "block_len": int(blocks.shape[1]), "num_tokens": int(num_tokens), "token_ids_sha256": data_hash},
        "fit": list(fits),
        "settings": asdict(settings),
        "results": results,
        "files": [name for name in (PROJECTIONS, QUANT_PLAN, QUERY_STATS, HEAD_BUDGETS, SALS_BASIS)
                  if name in results["written"]],
    }
    art.write_config(folder, config)
    shutil.rmtree(state.folder)
    return folder


def _write_fits(model, folder: Path, fits: tuple[str, ...], settings: CalibrationSettings, shape: ModelShape,
                collector: StatisticsCollector, tada_rows: list[dict[int, float]],
                fingerprint: dict[str, Any]) -> dict[str, Any]:
    results: dict[str, Any] = {"written": []}
    if "kqsvd" in fits:
        o_proj = o_proj_weights(model)
        key_spectra, value_spectra = kqsvd_spectra(collector.grams, collector.values, o_proj)
        key_ranks = settings.key_choice().ranks(key_spectra)
        value_ranks = settings.value_choice().ranks(value_spectra)
        projections = fit_projections(collector.grams, collector.values, o_proj, settings.method, key_ranks,
                                      value_ranks)
        write_projections(folder / PROJECTIONS, projections, fingerprint)
        results.update(key_ranks=key_ranks, value_ranks=value_ranks)
        results["written"].append(PROJECTIONS)
    if "query-stats" in fits:
        mu, sigma = collector.query_moments()
        save_query_stats(folder / QUERY_STATS, mu, sigma, fingerprint)
        results["written"].append(QUERY_STATS)
    if "head-budgets" in fits:
        copy, spread, events = collector.head_behaviour()
        content = head_budgets(copy, spread, events, settings.head_budget, settings.head_floor, settings.head_beta)
        write_head_budgets(folder / HEAD_BUDGETS, content)
        results["layer_budgets"] = content["budgets"]
        results["written"].append(HEAD_BUDGETS)
    if "tada" in fits:
        plan = plan_bits(tada_rows, Budget("average_bits", settings.tada_budget), shape.num_kv_heads,
                         shape.head_dim, settings.tada_group_size, settings.tada_residual_length)
        write_quant_plan(folder / QUANT_PLAN, plan)
        results["tada_sensitivity"] = [{str(b): v for b, v in row.items()} for row in tada_rows]
        results["tada_bits"] = plan.bits
        results["written"].append(QUANT_PLAN)
    if "sals" in fits:
        num_tokens = [g.num_tokens for g in collector.sals_grams]
        write_sals_basis(folder / SALS_BASIS, fit_sals_bases(collector.sals_grams), num_tokens, fingerprint)
        results["sals_tokens"] = num_tokens
        results["written"].append(SALS_BASIS)
    return results
