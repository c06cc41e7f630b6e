"""Sliding-window layers: exact while the window covers the sequence, refused by name beyond it.

kvtrain's cache and replay attend every kept token, as full attention does. The Mistral-7B-v0.1 twin has a window
on every layer (4096 shrunk to 32); a Qwen2.5 twin with its `use_sliding_window` switched on and
`max_window_layers` 1 has transformers 5's per-layer types (layer 0 full, layer 1 sliding), so the refusal must
name layer 1 only. Plain forwards (the full-cache teacher, calibration) keep transformers' own windowed mask.
"""

from __future__ import annotations

import pytest
import torch

from kvtrain.config import KVCompressionConfig, ScheduleConfig
from kvtrain.models import sliding_windows, tiny_tokenizer, twin_model
from kvtrain.runtime.cache import CompressedCache
from kvtrain.runtime.decode import teacher_forced_decode
from kvtrain.runtime.replay import replay_compression
from kvtrain.runtime.routing import observe_attention, use_kvtrain_attention
from kvtrain.training.run import main
from tests.training.conftest import TINY_ARGS

CONFIG = KVCompressionConfig(budget=12, sinks=2, recent=2, query_window=4, schedule=ScheduleConfig(interval=4))


def mixed() -> torch.nn.Module:
    return twin_model("qwen2.5-7b-instruct", use_sliding_window=True, sliding_window=24, max_window_layers=1)


def ids(length: int) -> torch.Tensor:
    return torch.randint(4, 128, (1, length), generator=torch.Generator().manual_seed(3))


def test_windows_per_layer():
    assert sliding_windows(twin_model("mistral-7b-v0.1").config) == [32, 32]
    assert sliding_windows(mixed().config) == [None, 24]
    assert sliding_windows(twin_model("mistral-7b-instruct-v0.3").config) == [None, None]


@pytest.mark.parametrize(("build", "layer", "window"), [(lambda: twin_model("mistral-7b-v0.1"), 0, 32),
                                                         (mixed, 1, 24)])
def test_cache_and_replay_past_the_window_are_refused_naming_the_layer(build, layer, window):
    model = build()
    message = rf"layer {layer} is a sliding-window layer \(sliding_window={window}\) and the sequence reaches 40"
    with pytest.raises(ValueError, match=message):
        teacher_forced_decode(model, CompressedCache.for_model(model, CONFIG), ids(40), prefill_len=40)
    with pytest.raises(ValueError, match=message), torch.no_grad(), replay_compression(model, CONFIG, prefill_len=20):
        model(input_ids=ids(40))
    with pytest.raises(ValueError, match=rf"layer {layer} is a sliding-window layer .* reaches {window + 1} tokens"):
        teacher_forced_decode(model, CompressedCache.for_model(model, CONFIG), ids(window + 1), prefill_len=window)


def test_within_the_window_the_cache_is_exact():
    model = mixed()
    config = KVCompressionConfig(budget=24, sinks=0, recent=0, schedule=ScheduleConfig(interval=4))
    decoded = teacher_forced_decode(model, CompressedCache.for_model(model, config), ids(24), prefill_len=12)
    with torch.no_grad():
        plain = model(input_ids=ids(24)).logits
    torch.testing.assert_close(decoded, plain, rtol=0, atol=1e-4)


def test_plain_forwards_keep_the_window():
    """The teacher (kvtrain attention without a route) and calibration (an observer) beyond the window equal
    transformers' own SDPA, whose mask applies the window: windows really matter at this length."""
    model = mixed()
    with torch.no_grad():
        sdpa = model(input_ids=ids(48)).logits
        use_kvtrain_attention(model)
        teacher = model(input_ids=ids(48)).logits
        with observe_attention(model, lambda *args: None):
            observed = model(input_ids=ids(48)).logits
        unwindowed = twin_model("qwen2.5-7b-instruct")(input_ids=ids(48)).logits
    torch.testing.assert_close(teacher, sdpa, rtol=0, atol=1e-5)
    torch.testing.assert_close(observed, sdpa, rtol=0, atol=1e-5)
    assert (unwindowed - sdpa).abs().max() > 1e-3


def test_training_blocks_longer_than_the_window_are_refused_before_loading(tmp_path):
    source = tmp_path / "twin"
    mixed().save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    args = [a if a != "32" else "40" for a in TINY_ARGS]  # --block_len 40
    with pytest.raises(ValueError, match=r"layer 1 is a sliding-window layer \(sliding_window=24\) .* reaches 40"):
        main(["--model_name_or_path", str(source), "--output_dir", str(tmp_path / "out"), *args, "--use_cpu", "true"])
