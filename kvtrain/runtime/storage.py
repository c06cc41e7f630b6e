"""How one side (keys or values) of a layer's cache is held: an encoded archive plus recent tokens.

Tokens arrive in full precision and stay so until the next compression event, which archives the
survivors through the layer's codec (low-rank coefficients, TaDA-packed deviations, or both). Attention
and scoring always read `view()`: the decoded archive followed by the recent tokens. The recent tokens
are the TaDA residual buffer; its length is bounded by the compression interval.

Replay keeps the archive as *round-tripped* full tensors instead of encoded ones (`straight_through`),
with the same values, so gradients pass through quantisation (straight-through estimator) and through
low-rank projections (which are linear). Given the encodings a cache made of the same tokens (`recorded`,
read from the cache's `fresh`), replay decodes those instead of encoding again (`Codec.replay_from`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvtrain.runtime.codecs import Codec, Encoded


@dataclass
class TokenStore:
    """One side of a layer's cache: `archive` (encoded, or round-tripped when straight-through) + `recent`."""

    recent: Tensor  # [b, h, m, d] full precision
    codec: Codec | None = None
    archive: Encoded | None = None
    straight_through: bool = False
    fresh: Encoded | None = None  # what the archiving that made this store encoded (its recent tokens then)

    @property
    def length(self) -> int:
        return self.archive_length + self.recent.shape[2]

    @property
    def archive_length(self) -> int:
        if self.archive is None:
            return 0
        return next(iter(self.archive.values())).shape[2]

    def view(self) -> Tensor:
        """All tokens as attention sees them: [b, h, n, d]."""
        if self.archive is None:
            return self.recent
        if self.straight_through:
            archived = self.archive["x"]
        else:
            archived = self.codec.decode(self.archive, self.recent.dtype)
        return torch.cat([archived, self.recent], dim=2)

    def take(self, idx: Tensor) -> Tensor:
        """Tokens `idx` [b, h, k] (columns of `view()`) as attention sees them, decoding only those: [b, h, k, d]."""
        n_archived, n_recent = self.archive_length, self.recent.shape[2]
        if n_archived == 0:
            return _gather(self.recent, idx)
        archived_idx = idx.clamp(max=n_archived - 1)
        if self.straight_through:
            archived = _gather(self.archive["x"], archived_idx)
        else:
            shared = self.codec.shared_across_heads
            if shared and not bool((idx == idx[:, :1]).all()):
                raise ValueError("taking different tokens per KV head from an archive whose data is shared by the heads")
            picked = {
                name: _gather(t, archived_idx[:, :1] if name in shared else archived_idx) for name, t in self.archive.items()
            }
            archived = self.codec.decode(picked, self.recent.dtype)
        if n_recent == 0:
            return archived
        recent = _gather(self.recent, (idx - n_archived).clamp(0, n_recent - 1))
        return torch.where((idx < n_archived)[..., None], archived, recent)

    def append(self, x: Tensor) -> "TokenStore":
        return TokenStore(torch.cat([self.recent, x], dim=2), self.codec, self.archive, self.straight_through)

    def _encode_recent(self, recorded: Encoded | None) -> tuple[Encoded, Encoded | None]:
        """(what the archive gains for the recent tokens, their encoding when one was made now)."""
        if not self.straight_through:
            fresh = self.codec.encode(self.recent)
            return fresh, fresh
        if recorded is None:
            return {"x": self.codec.roundtrip(self.recent)}, None
        counts = {t.shape[2] for t in recorded.values()}
        if counts != {self.recent.shape[2]}:
            raise ValueError(f"recorded encodings of {sorted(counts)} tokens for {self.recent.shape[2]} recent tokens")
        return {"x": self.codec.replay_from(self.recent, recorded)}, None

    def _all_encoded(self, recorded: Encoded | None) -> tuple[Encoded, Encoded | None]:
        """Archive and recent tokens together, the recent ones encoded now (or decoded from `recorded`)."""
        added, fresh = self._encode_recent(recorded)
        if self.archive is None:
            return added, fresh
        return {name: torch.cat([self.archive[name], added[name]], dim=2) for name in added}, fresh

    def gather(self, idx: Tensor, recorded: Encoded | None = None) -> "TokenStore":
        """Keep tokens `idx` [b, h, k] (positions along dim 2); the survivors are archived through the codec.
        `recorded` (replay only): a cache's encodings of the recent tokens, used instead of encoding them."""
        if self.codec is None:
            return TokenStore(_gather(self.recent, idx))
        encoded, fresh = self._all_encoded(recorded)
        shared = set() if self.straight_through else self.codec.shared_across_heads
        if shared and not bool((idx == idx[:, :1]).all()):
            raise ValueError(
                "a codec with per-token data shared by all KV heads (TaDA's mean) needs the same kept tokens in "
                "every head: use selection 'per_layer' with quantisation"
            )
        archive = {name: _gather(t, idx[:, :1] if name in shared else idx) for name, t in encoded.items()}
        return TokenStore(self._no_recent(), self.codec, archive, self.straight_through, fresh)

    def flush(self, recorded: Encoded | None = None) -> "TokenStore":
        """Archive the recent tokens without evicting any (a compression event under budget)."""
        if self.codec is None or self.recent.shape[2] == 0:
            return self
        encoded, fresh = self._all_encoded(recorded)
        return TokenStore(self._no_recent(), self.codec, encoded, self.straight_through, fresh)

    def _no_recent(self) -> Tensor:
        # A new empty tensor, not `recent[:, :, :0]`: that view would keep the whole archived buffer alive.
        return self.recent.new_empty(*self.recent.shape[:2], 0, self.recent.shape[3])

    @property
    def nbytes(self) -> int:
        archived = sum(t.nbytes for t in self.archive.values()) if self.archive is not None else 0
        return archived + self.recent.nbytes


def _gather(x: Tensor, idx: Tensor) -> Tensor:
    return torch.gather(x, 2, idx[..., None].expand(*idx.shape, x.shape[-1]))
