"""Low-rank KV projections learned jointly with the student (`train_projections`).

`TrainableProjections` holds, for every layer the compression config compresses, the key-side and the
value-side pair (`a`, `b`: ``[h_kv, d, r]``, as in `LowRankPair`) as float32 parameters initialised from
the calibrated file (truncated to the configured ranks) and rescaled to balanced factors (`balanced`: the
same map, factors an optimizer can move alike). It is attached to the student as a submodule (`attach`),
so that the Trainer's optimizer, DDP's gradient all-reduce, `accelerate`'s device placement and
DeepSpeed ZeRO-2 treat the projections like any other weight; the replay of every training step computes
with these very parameters (`layer_pairs`), so gradients reach them through the (linear) low-rank codec.

They are kept out of the HF weights (`save_pretrained` writes ordinary model or adapter files) and saved
in the calibration format instead (`save`): the same file as the calibrated one, with the trained layers'
pairs replaced. Layers and sides that are not trained keep their calibrated tensors, and every layer keeps
its calibrated spectrum ``S``, which describes the calibration objective, not the trained pair.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kvtrain.artifacts.format import sha256_file
from kvtrain.artifacts.projections import LowRankPair, Projections, read_projections, write_projections
from kvtrain.config import KVCompressionConfig
from kvtrain.models import model_fingerprint
from kvtrain.runtime.compressor import LayerPairs, projections_for

# Name of the submodule on the student, hence the prefix of the projections' parameter names.
ATTRIBUTE = "kv_projections"
# File holding the projections inside an intermediate checkpoint folder.
CHECKPOINT_FILE = "kv_projections.safetensors"
_SIDES = ("key", "value")


class TrainableProjections(nn.Module):
    def __init__(self, calibrated: Projections, trained: LayerPairs, source: Path, fingerprint: dict):
        super().__init__()
        self.calibrated = calibrated
        self.source = source
        self.source_sha256 = sha256_file(source)
        self.fingerprint = fingerprint
        self.pairs = nn.ParameterDict()
        for side, pairs in zip(_SIDES, trained):
            for layer, pair in enumerate(pairs):
                if pair is not None:
                    a, b = balanced(pair.a.detach().to(torch.float32), pair.b.detach().to(torch.float32))
                    self.pairs[_name(side, layer, "a")] = nn.Parameter(a)
                    self.pairs[_name(side, layer, "b")] = nn.Parameter(b)

    @classmethod
    def from_config(cls, kv_config: KVCompressionConfig, model_config) -> "TrainableProjections":
        """The pairs of every compressed layer's low-rank sides, from `kv_config.lowrank.projections`.

        Raises ValueError when the config has no low-rank projections, or none that any layer uses.
        """
        cls.check_config(kv_config)
        lowrank = kv_config.lowrank
        source = Path(lowrank.projections)
        fingerprint = model_fingerprint(model_config)
        key_pairs, value_pairs = projections_for(lowrank, model_config)  # checks the fingerprint and the ranks
        calibrated = read_projections(
            source, fingerprint["num_hidden_layers"], fingerprint["num_key_value_heads"], fingerprint["head_dim"]
        )
        num_layers = model_config.num_hidden_layers
        # A dense layer never encodes through its codecs: its pairs would receive no gradient.
        compressed = [kv_config.layer_policy(i, num_layers) is not None for i in range(num_layers)]
        trained = tuple([p if c else None for p, c in zip(pairs, compressed)] for pairs in (key_pairs, value_pairs))
        if not any(p is not None for pairs in trained for p in pairs):
            raise ValueError(f"train_projections=true, but no compressed layer uses the projections of {source}")
        return cls(calibrated, trained, source, fingerprint)

    @staticmethod
    def check_config(kv_config: KVCompressionConfig) -> None:
        """Raise ValueError unless the config has low-rank projections to train (checked before any model loads)."""
        lowrank = kv_config.lowrank
        if lowrank is None or not lowrank.projections:
            raise ValueError(
                "train_projections=true needs low-rank projections, but the compression config has no "
                "`lowrank.projections` (give a --kv_config whose lowrank section names a calibrated "
                "projections.safetensors)"
            )
        if not (lowrank.keys or lowrank.values):
            raise ValueError("train_projections=true, but lowrank.keys and lowrank.values are both false: nothing to train")

    def layer_pairs(self) -> LayerPairs:
        """Per layer, the trainable key and value pairs (None where not trained), for `replay_compression`."""
        sides = []
        for side, calibrated in zip(_SIDES, (self.calibrated.keys, self.calibrated.values)):
            sides.append([self._pair(side, layer, c) for layer, c in enumerate(calibrated)])
        return sides[0], sides[1]

    def _pair(self, side: str, layer: int, calibrated: LowRankPair) -> LowRankPair | None:
        a = _name(side, layer, "a")
        if a not in self.pairs:
            return None
        return LowRankPair(self.pairs[a], self.pairs[_name(side, layer, "b")], calibrated.singular_values)

    def projections(self) -> Projections:
        """The calibrated projections with the trained pairs in place of theirs (detached, on CPU)."""
        sides = []
        for pairs, calibrated in zip(self.layer_pairs(), (self.calibrated.keys, self.calibrated.values)):
            sides.append([
                c if p is None else LowRankPair(p.a.detach().float().cpu(), p.b.detach().float().cpu(), c.singular_values)
                for p, c in zip(pairs, calibrated)
            ])
        return Projections(self.calibrated.method, sides[0], sides[1])

    def save(self, path: str | Path) -> None:
        """Write the current projections in the calibration format (atomically), with the calibrated fingerprint."""
        write_projections(Path(path), self.projections(), self.fingerprint)

    @torch.no_grad()
    def load(self, path: str | Path) -> None:
        """Set the trained pairs from a file written by `save` (a checkpoint's); every error names the file."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: missing (the checkpoint was written without train_projections)")
        f = self.fingerprint
        saved = read_projections(path, f["num_hidden_layers"], f["num_key_value_heads"], f["head_dim"])
        for side, saved_pairs in zip(_SIDES, (saved.keys, saved.values)):
            for layer, pair in enumerate(saved_pairs):
                for part in ("a", "b"):
                    name = _name(side, layer, part)
                    if name not in self.pairs:
                        continue
                    target, value = self.pairs[name], getattr(pair, part)
                    if value.shape != target.shape:
                        raise ValueError(
                            f"{path}: layer {layer} {side} {part} has shape {tuple(value.shape)}, "
                            f"the run trains {tuple(target.shape)}"
                        )
                    target.copy_(value)

    def metadata(self) -> dict:
        """What `kvtrain_training.json` records about the projections."""
        return {"trained": True, "calibrated_file": str(self.source), "calibrated_sha256": self.source_sha256}

    def attach(self, model: nn.Module) -> None:
        """Register as the `kv_projections` submodule of `model` (a causal LM or a PeftModel)."""
        if hasattr(model, ATTRIBUTE):
            raise ValueError(f"{type(model).__name__} already has an attribute {ATTRIBUTE!r}")
        model.add_module(ATTRIBUTE, self)

    @staticmethod
    def is_own(parameter_name: str) -> bool:
        """Whether a (state-dict or parameter) name of the student belongs to the attached projections."""
        return parameter_name.startswith(ATTRIBUTE + ".") or f".{ATTRIBUTE}." in parameter_name


def balanced(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same low-rank map ``b a^T`` (``[h, d, r]`` each) with every rank column of `a` and `b` of equal norm.

    The calibrated factors are far apart in scale (KQ-SVD's whitened `a` ~1e-4 per entry, `b` ~10), and Adam
    moves every entry by about the learning rate: at a rate that trains `b`, `a` would be destroyed in a few
    steps. Rescaling column j by ``sqrt(|b_j| / |a_j|)`` leaves ``b a^T`` unchanged and gives both the same scale.
    """
    tiny = torch.finfo(a.dtype).tiny
    scale = (b.norm(dim=1, keepdim=True).clamp_min(tiny) / a.norm(dim=1, keepdim=True).clamp_min(tiny)).sqrt()
    return a * scale, b / scale


def _name(side: str, layer: int, part: str) -> str:
    return f"{side}_{layer}_{part}"
