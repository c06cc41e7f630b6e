"""`KVCompressionArguments`: the one set of compression flags shared by every entry point.

The training scripts parse it with TrlParser (recipes set its fields in YAML); the `kvtrain` CLI adds the
same fields as flags. Either way `to_config()` turns it into a validated `KVCompressionConfig`: a config
file first, then each field that is set overriding it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from kvtrain.config import KVCompressionConfig

logger = logging.getLogger("kvtrain")


@dataclass
class KVCompressionArguments:
    kv_config: Optional[str] = field(default=None, metadata={"help": "KVCompressionConfig file (JSON or YAML)"})
    kv_scorer: Optional[str] = field(default=None, metadata={"help": "eviction policy, e.g. snapkv, gkv, expected_attention"})
    kv_param: list[str] = field(default_factory=list, metadata={"help": "scorer hyperparameter KEY=VALUE (repeatable)"})
    kv_budget: Optional[int] = field(default=None, metadata={"help": "tokens kept per KV head"})
    kv_ratio: Optional[float] = field(default=None, metadata={"help": "fraction of tokens evicted (instead of a budget)"})
    kv_sinks: Optional[int] = field(default=None, metadata={"help": "first tokens always kept"})
    kv_recent: Optional[int] = field(default=None, metadata={"help": "most recent tokens always kept"})
    kv_window: Optional[int] = field(default=None, metadata={"help": "observation window (queries) used for scoring"})
    kv_interval: Optional[int] = field(default=None, metadata={"help": "compress every N decode steps"})
    kv_prefill_chunk: Optional[int] = field(default=None, metadata={"help": "chunked prefill size"})
    kv_selection: Optional[str] = field(default=None, metadata={"help": "per_head, per_layer or head_adaptive"})
    kv_keepkv: bool = field(default=False, metadata={"help": "merge evicted entries (KeepKV) instead of dropping them"})

    def to_config(self) -> KVCompressionConfig:
        # Imported here: the flags themselves are light, so `kvtrain --help` does not import torch.
        from kvtrain.config import ConfigError, KVCompressionConfig, MergeConfig

        if self.kv_budget is not None and self.kv_ratio is not None:
            # Each replaces the other in the config: neither may silently win.
            raise ConfigError(f"kv_budget = {self.kv_budget} and kv_ratio = {self.kv_ratio} conflict: give one of them "
                              "(tokens kept per KV head, or the fraction evicted)")
        overrides = [f.name for f in dataclasses.fields(self) if f.name != "kv_config" and getattr(self, f.name) not in (None, False, [])]
        if self.kv_config and overrides:
            # A recipe's kv_* fields silently winning over a --kv_config file given on the command line is the
            # mistake this guards against.
            logger.warning("%s overridden by %s", self.kv_config, ", ".join(overrides))
        base = KVCompressionConfig.load(self.kv_config) if self.kv_config else KVCompressionConfig()
        data = base.to_dict()
        if self.kv_scorer:
            data["scorer"] = {"name": self.kv_scorer, "params": {}}
        data["scorer"]["params"].update(parse_key_values(self.kv_param, "kv_param"))
        if self.kv_budget is not None:
            data["budget"], data["compression_ratio"] = self.kv_budget, None
        if self.kv_ratio is not None:
            data["budget"], data["compression_ratio"] = None, self.kv_ratio
        for name, target in [("kv_sinks", "sinks"), ("kv_recent", "recent"), ("kv_window", "query_window"), ("kv_selection", "selection")]:
            if getattr(self, name) is not None:
                data[target] = getattr(self, name)
        if self.kv_interval is not None:
            data["schedule"]["interval"] = self.kv_interval
        if self.kv_prefill_chunk is not None:
            data["schedule"]["prefill_chunk"] = self.kv_prefill_chunk
        if self.kv_keepkv:
            data["merge"] = dataclasses.asdict(MergeConfig())
        return KVCompressionConfig.from_dict(data, source=self.kv_config or "compression arguments")

    @classmethod
    def add_to_parser(cls, parser: argparse.ArgumentParser) -> None:
        """Add every field as a `--kv-...` flag (for argparse-based commands)."""
        group = parser.add_argument_group("compression (a --kv-config file, with any flag overriding it)")
        # Resolved hints, not `Field.type`: HfArgumentParser rewrites the latter in place when it parses the class.
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            help_text = f.metadata.get("help")
            hint = hints[f.name]
            if hint is bool:
                group.add_argument(flag, dest=f.name, action="store_true", help=help_text)
            elif typing.get_origin(hint) is list:
                group.add_argument(flag, dest=f.name, action="append", default=[], help=help_text)
            else:
                kind = next((t for t in typing.get_args(hint) if t in (int, float)), str)
                group.add_argument(flag, dest=f.name, type=kind, default=None, help=help_text)

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> "KVCompressionArguments":
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse reports anything else as a usage error naming the flag)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def parse_key_values(items: list[str], flag: str) -> dict[str, Any]:
    """``KEY=VALUE`` items of a repeatable flag (`flag` names it in the error): numbers, booleans, lists and null
    as JSON; anything else a plain string (e.g. a path)."""
    from kvtrain.config import ConfigError

    values: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {item!r}: expected KEY=VALUE")
        try:
            values[key] = json.loads(value)
        except json.JSONDecodeError:
            values[key] = value
    return values
