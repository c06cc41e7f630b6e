"""`KVCompressionConfig`: one validated dataclass tree describing how every layer's KV cache is compressed.

It round-trips through JSON and YAML; loading rejects unknown keys and impossible values with an error
that names the file, the field and the value. `layer_policy(i, num_layers)` resolves the per-layer view
(budget, overrides, dense layers) that the cache, replay and evaluation all consume.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from kvtrain.errors import UserError
from kvtrain.io import atomic_write_text, parse_error_line
from kvtrain.policies import SCORERS
from kvtrain.policies.budgets import layer_budgets
from kvtrain.policies.select import SELECTION_MODES

SCHEMA_VERSION = 1


class ConfigError(UserError):
    """A configuration value is invalid; the message names the source, field and value."""


@dataclass
class ScorerConfig:
    """Which registered scorer ranks the keys, and its hyperparameters (see kvtrain.policies)."""

    name: str = "snapkv"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class MergeConfig:
    """KeepKV merging: evicted entries are ZIP-merged into their most similar kept key."""

    name: str = "keepkv"
    threshold: float = 0.8
    ema_alpha: float = 0.9
    max_rescale: float = 1.25  # trust region of the ZIP key rescale (see KeepKVMerger)


@dataclass
class QuantConfig:
    """TaDA quantisation of the archived keys/values (None bits: that side stays full precision)."""

    key_bits: int | None = 4
    value_bits: int | None = 4
    group_size: int = 32
    plan: str | None = None  # quant_plan.json from `kvtrain calibrate --fit tada`: per-layer bits for both sides


@dataclass
class LowRankConfig:
    """Low-rank keys/values from a projections file written by `kvtrain calibrate --fit kqsvd`."""

    projections: str = ""
    keys: bool = True
    values: bool = True
    key_rank: int | None = None  # truncate the fitted projections (columns are nested)
    value_rank: int | None = None


@dataclass
class SalsConfig:
    """SALS (docs/methods.md#sals): keys held as rank-`rank` latents of the joint pre-RoPE key (all KV heads of a
    layer), and at each decode step only the selected tokens are reconstructed, rotated and attended.

    Selected = `sinks` first + `recent` last stored tokens + the best other tokens by the `selector`'s score:
    `top_k` of them, or `token_fraction` of the tokens the row has stored (rounded up); exactly one is set.
    Selectors: ``latent`` (SALS: latent query . latent key on the leading `selection_rank` dims, default
    rank // 2), ``recent`` (no score: the next most recent tokens) and ``exact`` (oracle: head-summed
    post-RoPE q . k with the uncompressed keys, which only replay has). Values stay full precision, or
    TaDA-quantised on the schedule when `quant.value_bits` is set. Layers in `dense_layers` keep a full cache.
    """

    basis: str = ""  # sals_basis.safetensors from `kvtrain calibrate --fit sals`
    rank: int | None = None
    selection_rank: int | None = None
    top_k: int | None = None
    token_fraction: float | None = None
    sinks: int = 16
    recent: int = 64
    selector: str = "latent"

    @property
    def resolved_selection_rank(self) -> int:
        return self.selection_rank if self.selection_rank is not None else max(1, self.rank // 2)


SALS_SELECTORS = ("latent", "recent", "exact")


@dataclass
class ScheduleConfig:
    """When compression runs: after each prefill chunk, then every `interval` decode steps (G-KV style)."""

    interval: int = 128
    prefill_chunk: int | None = None  # InfiniPot-style chunked prefill: peak cache memory capped by budget+chunk
    compress_prefill: bool = True


@dataclass
class LayerPolicy:
    """The resolved compression settings of one layer (what the cache and replay consume)."""

    layer_idx: int
    budget: int | None  # tokens kept per KV head; None when `compression_ratio` sets it per event
    compression_ratio: float | None
    sinks: int
    recent: int
    scorer: ScorerConfig
    selection: str
    safeguard: float
    query_window: int
    whitelist: list[tuple[int, int]]
    fair_spans: list[tuple[int, int]]
    merge: MergeConfig | None
    schedule: ScheduleConfig

    def budget_at(self, tokens_seen: int) -> int:
        """Tokens each KV head keeps after an event at which `tokens_seen` tokens have been seen."""
        if self.budget is not None:
            return self.budget
        kept = math.ceil((1.0 - self.compression_ratio) * tokens_seen)
        return max(kept, self.sinks + self.recent, 1)


# Fields a per-layer override may change.
_OVERRIDABLE = (
    "budget",
    "compression_ratio",
    "sinks",
    "recent",
    "scorer",
    "selection",
    "safeguard",
    "query_window",
)


# The sections of a config that are dataclasses of their own (None: the feature is off).
_SECTIONS = {"merge": MergeConfig, "quant": QuantConfig, "lowrank": LowRankConfig, "sals": SalsConfig,
             "schedule": ScheduleConfig}
_OPTIONAL_SECTIONS = ("merge", "quant", "lowrank", "sals")


@dataclass
class KVCompressionConfig:
    """How the KV cache of every layer is compressed.

    Exactly one of `budget` (tokens kept per KV head after each compression event) and
    `compression_ratio` (fraction of the tokens seen that is evicted, the kvpress convention) is set.
    """

    budget: int | None = 512
    compression_ratio: float | None = None
    sinks: int = 4
    recent: int = 16
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    selection: str = "per_head"
    safeguard: float = 0.2
    query_window: int = 16
    layer_budgets: Union[str, list[int]] = "uniform"  # "uniform", "pyramid", a JSON file path, or a list
    whitelist: list[tuple[int, int]] = field(default_factory=list)  # column spans always kept
    fair_spans: list[tuple[int, int]] = field(default_factory=list)  # spans with proportional quotas
    merge: MergeConfig | None = None
    quant: QuantConfig | None = None
    lowrank: LowRankConfig | None = None
    sals: SalsConfig | None = None
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    dense_layers: list[int] = field(default_factory=list)  # layers left uncompressed
    layers: dict[int, dict[str, Any]] = field(default_factory=dict)  # per-layer overrides
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self, source: str = "config") -> None:
        """Check every field on its own and against the others (the model is checked when the config is bound to
        one, `kvtrain.runtime.binding.check_config_for_model`)."""

        def fail(name: str, value: Any, why: str) -> None:
            raise ConfigError(f"{source}: field {name!r} = {value!r}: {why}")

        for name, kind in _SECTIONS.items():  # before any field of a section is read
            value = getattr(self, name)
            if not (isinstance(value, kind) or (value is None and name in _OPTIONAL_SECTIONS)):
                fail(name, value, f"must be a {kind.__name__}{' or None' if name in _OPTIONAL_SECTIONS else ''} "
                     f"(build one, e.g. {kind.__name__}(...), or load mappings with KVCompressionConfig.from_dict)")
        if self.schema_version != SCHEMA_VERSION:
            fail("schema_version", self.schema_version, f"this kvtrain reads schema version {SCHEMA_VERSION}")
        if (self.budget is None) == (self.compression_ratio is None):
            fail("budget", self.budget, "set exactly one of 'budget' and 'compression_ratio'")
        self._validate_layer_fields(fail, "", {name: getattr(self, name) for name in _OVERRIDABLE})
        if self.budget is not None and self.sinks + self.recent > self.budget:
            fail("budget", self.budget, f"smaller than sinks + recent = {self.sinks + self.recent}")
        if not _is_int(self.schedule.interval, minimum=1):
            fail("schedule.interval", self.schedule.interval, "must be a positive integer")
        chunk = self.schedule.prefill_chunk
        if chunk is not None and not _is_int(chunk, minimum=1):
            fail("schedule.prefill_chunk", chunk, "must be a positive integer or null")
        if not isinstance(self.schedule.compress_prefill, bool):
            fail("schedule.compress_prefill", self.schedule.compress_prefill, "must be true or false")
        for name in ("whitelist", "fair_spans"):
            for span in getattr(self, name):
                if len(span) != 2 or not all(_is_int(x, minimum=0) for x in span) or not span[0] < span[1]:
                    fail(name, span, "each span must be [start, end) with 0 <= start < end")
        if self.merge is not None and not (_is_number(self.merge.ema_alpha) and 0.0 < self.merge.ema_alpha < 1.0):
            fail("merge.ema_alpha", self.merge.ema_alpha, "must be in (0, 1)")
        if self.merge is not None and self.merge.name != "keepkv":
            fail("merge.name", self.merge.name, "the only merging method is 'keepkv'")
        if self.sals is not None:  # first: its message says what a SALS config must change
            self._validate_sals(fail)
        if self.quant is not None:
            for name in ("key_bits", "value_bits"):
                bits = getattr(self.quant, name)
                if isinstance(bits, bool) or bits not in (None, 2, 4, 8):
                    fail(f"quant.{name}", bits, "must be 2, 4, 8 or null")
            if not _is_int(self.quant.group_size, minimum=1):
                fail("quant.group_size", self.quant.group_size, "must be a positive integer")
            evicts = self.compression_ratio != 0.0
            if evicts and self.selection != "per_layer":
                fail(
                    "selection", self.selection,
                    "TaDA stores one mean per token for all KV heads, so quantisation with eviction needs "
                    "'per_layer' selection (or compression_ratio 0 to quantise without evicting)",
                )
        if self.lowrank is not None:
            if not self.lowrank.projections:
                fail("lowrank.projections", self.lowrank.projections, "must name a projections file")
            for name in ("key_rank", "value_rank"):
                rank = getattr(self.lowrank, name)
                if rank is not None and not _is_int(rank, minimum=1):
                    fail(f"lowrank.{name}", rank, "must be a positive integer or null")
        if self.merge is not None and (self.quant is not None or self.lowrank is not None):
            fail("merge", self.merge.name, "merging cannot be combined with quantisation or low rank yet")
        if isinstance(self.layer_budgets, list) and not all(_is_int(b, minimum=1) for b in self.layer_budgets):
            fail("layer_budgets", self.layer_budgets, "must be positive integers")
        if not isinstance(self.layer_budgets, (str, list)):
            fail("layer_budgets", self.layer_budgets, "must be 'uniform', 'pyramid', a list or a head-budgets file")
        if not all(_is_int(i, minimum=0) for i in self.dense_layers):
            fail("dense_layers", self.dense_layers, "must be layer indices (non-negative integers)")
        for idx, override in self.layers.items():
            unknown = set(override) - set(_OVERRIDABLE)
            if unknown:
                fail(f"layers.{idx}", sorted(unknown), f"per-layer overrides may only set {_OVERRIDABLE}")
            self._validate_layer_fields(fail, f"layers.{idx}.", override)
        self._warn_short_windows(source)

    @staticmethod
    def _validate_layer_fields(fail, prefix: str, values: dict[str, Any]) -> None:
        """The fields a per-layer override may set, for the top level or one override (`prefix`)."""
        if values.get("budget") is not None and not _is_int(values["budget"], minimum=1):
            fail(prefix + "budget", values["budget"], "must be a positive integer number of tokens")
        ratio = values.get("compression_ratio")
        if ratio is not None and not (_is_number(ratio) and 0.0 <= ratio < 1.0):
            fail(prefix + "compression_ratio", ratio, "must be in [0, 1): the fraction evicted")
        for name in ("sinks", "recent"):
            if name in values and not _is_int(values[name], minimum=0):
                fail(prefix + name, values[name], "must be a non-negative integer")
        if "selection" in values and values["selection"] not in SELECTION_MODES:
            fail(prefix + "selection", values["selection"], f"must be one of {SELECTION_MODES}")
        if "safeguard" in values and not (_is_number(values["safeguard"]) and 0.0 <= values["safeguard"] <= 1.0):
            fail(prefix + "safeguard", values["safeguard"], "must be in [0, 1]")
        if "query_window" in values and not _is_int(values["query_window"], minimum=1):
            fail(prefix + "query_window", values["query_window"], "must be a positive integer")
        if "scorer" in values:
            scorer = values["scorer"]
            if isinstance(scorer, dict):
                unknown = set(scorer) - {"name", "params"}
                if unknown:
                    fail(prefix + "scorer", sorted(unknown), "a scorer has only 'name' and 'params'")
                scorer = ScorerConfig(**scorer)
            if not isinstance(scorer, ScorerConfig):
                fail(prefix + "scorer", scorer, "must be a mapping with 'name' and 'params'")
            where = prefix + "scorer"
            if scorer.name not in SCORERS:
                fail(f"{where}.name", scorer.name, f"unknown scorer; registered: {sorted(SCORERS)}")
            cls = SCORERS[scorer.name]
            if not isinstance(scorer.params, dict):
                fail(f"{where}.params", scorer.params, "must be a mapping of parameter names to values")
            unknown = set(scorer.params) - cls.field_names()
            if unknown:
                fail(f"{where}.params", sorted(unknown), f"not parameters of {scorer.name!r}: {sorted(cls.field_names())}")
            for name, value in scorer.params.items():
                expected = cls.param_type_error(name, value)
                if expected:
                    fail(f"{where}.params.{name}", value, f"must be {expected}")

    def _warn_short_windows(self, source: str) -> None:
        """Warn where a scorer that accounts for every decoded query sees fewer than an interval of them."""
        interval = self.schedule.interval
        settings = [("query_window", self.scorer, self.query_window)] + [
            (f"layers.{i}.query_window", o.get("scorer", self.scorer), o.get("query_window", self.query_window))
            for i, o in self.layers.items()
        ]
        for where, scorer, window in settings:
            name = scorer.name if isinstance(scorer, ScorerConfig) else scorer["name"]
            if SCORERS[name].counts_every_query and window < interval:
                warnings.warn(
                    f"{source}: scorer {name!r} accumulates the attention of every decoded query, but "
                    f"{where}={window} < schedule.interval={interval}: the {interval - window} oldest queries of "
                    f"each interval are never counted; set {where} >= schedule.interval",
                    stacklevel=3,
                )

    def _validate_sals(self, fail) -> None:
        sals = self.sals
        if not sals.basis:
            fail("sals.basis", sals.basis, "must name a sals_basis.safetensors file")
        if isinstance(sals.rank, bool) or not isinstance(sals.rank, int) or sals.rank < 1:
            fail("sals.rank", sals.rank, "must be a positive integer (latent dims per token and layer)")
        r_star = sals.selection_rank
        if r_star is not None and (isinstance(r_star, bool) or not isinstance(r_star, int) or not 1 <= r_star <= sals.rank):
            fail("sals.selection_rank", r_star, f"must be an integer in [1, rank={sals.rank}] or null (rank // 2)")
        if (sals.top_k is None) == (sals.token_fraction is None):
            fail("sals.top_k", sals.top_k, "set exactly one of 'sals.top_k' and 'sals.token_fraction'")
        if sals.top_k is not None and (isinstance(sals.top_k, bool) or not isinstance(sals.top_k, int) or sals.top_k < 0):
            fail("sals.top_k", sals.top_k, "must be a non-negative integer")
        if sals.token_fraction is not None and not 0.0 < sals.token_fraction <= 1.0:
            fail("sals.token_fraction", sals.token_fraction, "must be in (0, 1]")
        for name in ("sinks", "recent"):
            value = getattr(sals, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                fail(f"sals.{name}", value, "must be a non-negative integer")
        if sals.selector not in SALS_SELECTORS:
            fail("sals.selector", sals.selector, f"must be one of {SALS_SELECTORS}")
        # SALS keys are latents that every decode step selects from: nothing else may evict or encode them.
        if self.compression_ratio != 0.0:
            fail("compression_ratio", self.compression_ratio,
                 "SALS evicts nothing: set compression_ratio: 0 and no budget")
        if self.merge is not None:
            fail("merge", self.merge.name, "merging cannot be combined with SALS")
        if self.lowrank is not None:
            fail("lowrank", self.lowrank.projections, "SALS keys are already low rank; remove the lowrank section")
        if self.quant is not None and self.quant.key_bits is not None:
            fail("quant.key_bits", self.quant.key_bits, "SALS keys are latents and are not quantised: set null")

    # ------------------------------------------------------------------ per layer
    def layer_policy(self, layer_idx: int, num_layers: int) -> LayerPolicy | None:
        """The settings of one layer, or None for a dense (uncompressed) layer."""
        if layer_idx in self.dense_layers:
            return None
        values = {name: getattr(self, name) for name in _OVERRIDABLE}
        if self.budget is not None:
            values["budget"] = layer_budgets(self.layer_budgets, num_layers, self.budget)[layer_idx]
        values.update(self.layers.get(layer_idx, {}))
        scorer = values["scorer"]
        if isinstance(scorer, dict):
            scorer = ScorerConfig(**scorer)
        return LayerPolicy(
            layer_idx=layer_idx,
            budget=values["budget"],
            compression_ratio=values["compression_ratio"],
            sinks=values["sinks"],
            recent=values["recent"],
            scorer=scorer,
            selection=values["selection"],
            safeguard=values["safeguard"],
            query_window=values["query_window"],
            whitelist=[tuple(s) for s in self.whitelist],
            fair_spans=[tuple(s) for s in self.fair_spans],
            merge=self.merge,
            schedule=self.schedule,
        )

    # ------------------------------------------------------------------ artifact files
    def with_artifact_paths(self, change) -> "KVCompressionConfig":
        """A copy whose referenced files (projections, quant plan, SALS basis, layer budgets, query statistics) are
        replaced by `change(path) -> path`; used to bundle a config with its artifacts and to resolve it."""
        data = self.to_dict()
        if data["lowrank"]:
            data["lowrank"]["projections"] = change(data["lowrank"]["projections"])
        if data["quant"] and data["quant"]["plan"]:
            data["quant"]["plan"] = change(data["quant"]["plan"])
        if data["sals"]:
            data["sals"]["basis"] = change(data["sals"]["basis"])
        if isinstance(data["layer_budgets"], str) and data["layer_budgets"] not in ("uniform", "pyramid"):
            data["layer_budgets"] = change(data["layer_budgets"])
        scorers = [data["scorer"]] + [o["scorer"] for o in data["layers"].values() if isinstance(o.get("scorer"), dict)]
        for scorer in scorers:
            stats = scorer["params"].get("stats")
            if scorer["name"] == "expected_attention" and stats not in (None, "online"):
                scorer["params"]["stats"] = change(stats)
        return KVCompressionConfig.from_dict(data)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["whitelist"] = [list(s) for s in self.whitelist]
        data["fair_spans"] = [list(s) for s in self.fair_spans]
        data["layers"] = {str(k): v for k, v in self.layers.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "KVCompressionConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
        data = dict(data)
        nested = {
            "scorer": ScorerConfig,
            "merge": MergeConfig,
            "schedule": ScheduleConfig,
            "quant": QuantConfig,
            "lowrank": LowRankConfig,
            "sals": SalsConfig,
        }
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {sorted(unknown)}; known fields: {sorted(known)}")
        for name, sub in nested.items():
            value = data.get(name)
            if isinstance(value, dict):
                sub_known = {f.name for f in dataclasses.fields(sub)}
                bad = set(value) - sub_known
                if bad:
                    raise ConfigError(f"{source}: unknown field(s) {sorted(f'{name}.{b}' for b in bad)}")
                data[name] = sub(**value)
            elif value is not None and not isinstance(value, sub):
                raise ConfigError(f"{source}: field {name!r} = {value!r}: expected a mapping")
        if "layers" in data:
            try:
                data["layers"] = {int(k): dict(v) for k, v in data["layers"].items()}
            except (TypeError, ValueError, AttributeError) as err:
                raise ConfigError(f"{source}: field 'layers' must map layer indices to overrides ({err})") from None
        for name in ("whitelist", "fair_spans"):
            if name in data:
                data[name] = [tuple(s) for s in data[name]]
        if "compression_ratio" in data and data["compression_ratio"] is not None and "budget" not in data:
            data["budget"] = None
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                config = cls(**data)
            for warning in caught:  # said again, naming the file instead of "config"
                warnings.warn(str(warning.message).replace("config:", f"{source}:", 1), warning.category, stacklevel=2)
            return config
        except ConfigError as err:
            raise ConfigError(str(err).replace("config:", f"{source}:", 1)) from None
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{source}: {err}") from None

    def save(self, path: str | Path) -> None:
        """Write JSON or YAML (by suffix) atomically."""
        path = Path(path)
        data = self.to_dict()
        text = yaml.safe_dump(data, sort_keys=False) if path.suffix in (".yaml", ".yml") else json.dumps(data, indent=2)
        atomic_write_text(path, text)

    @classmethod
    def load(cls, path: str | Path) -> "KVCompressionConfig":
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise ConfigError(f"{path}: cannot read the compression config ({err.strerror})") from None
        try:
            data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
        except (yaml.YAMLError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}: not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'}: {parse_error_line(err)}") from None
        return cls.from_dict(data, source=str(path))


def _is_int(value: Any, *, minimum: int) -> bool:
    """An integer (a bool is not one) of at least `minimum`."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
