"""kvtrain.data: embedded text and its fixed split, local files, `datasets` folders, token blocks."""

from __future__ import annotations

import json
from pathlib import Path
from pydoc_data.topics import topics

import pytest
import torch

from kvtrain.data import embedded_text, load_texts, token_blocks
from kvtrain.errors import UserError
from kvtrain.models import tiny_tokenizer


def test_embedded_text_holds_every_topic_in_sorted_key_order() -> None:
    text = embedded_text()
    assert text == embedded_text()
    positions = []
    start = 0
    for key in sorted(topics):
        start = text.index(topics[key], start)
        positions.append(start)
    assert positions == sorted(positions) and len(positions) == len(topics)


def test_embedded_split_rule() -> None:
    train, heldout = load_texts(None, "train"), load_texts("embedded", "heldout")
    expected_train, expected_heldout = [], []
    for i, key in enumerate(sorted(topics)):
        (expected_heldout if (i + 1) % 5 == 0 else expected_train).append(topics[key])
    assert train == expected_train and heldout == expected_heldout
    assert len(heldout) == len(topics) // 5
    # Disjoint, and together the whole text; the split is the same on every call.
    assert not set(train) & set(heldout)
    assert sorted(train + heldout) == sorted(topics.values())
    assert load_texts() == train and load_texts(split="heldout") == heldout


def test_embedded_rejects_unknown_split() -> None:
    with pytest.raises(ValueError, match="'validation'.*train, heldout"):
        load_texts(None, "validation")


def test_txt_file_is_one_document(tmp_path: Path) -> None:
    path = tmp_path / "book.txt"
    path.write_text("First paragraph.\n\nSecond paragraph.\n", encoding="utf-8")
    assert load_texts(str(path)) == ["First paragraph.\n\nSecond paragraph.\n"]


def test_txt_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.txt"
    with pytest.raises(UserError, match="missing.txt.*no such file"):
        load_texts(str(missing))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="empty.txt"):
        load_texts(str(empty))
    path = tmp_path / "book.txt"
    path.write_text("words")
    with pytest.raises(ValueError, match="book.txt.*'heldout'"):
        load_texts(str(path), "heldout")
    other = tmp_path / "table.csv"
    other.write_text("a,b")
    with pytest.raises(ValueError, match="table.csv"):
        load_texts(str(other))


def _write_jsonl(path: Path, records: list) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n", encoding="utf-8")


def test_jsonl_text_and_messages(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    _write_jsonl(path, [
        {"text": "plain document"},
        {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello.\nBye."}]},
    ])
    assert load_texts(str(path)) == ["plain document", "user: Hi?\nassistant: Hello.\nBye."]
    custom = tmp_path / "custom.jsonl"
    _write_jsonl(custom, [{"body": "one"}, {"body": "two"}])
    assert load_texts(str(custom), text_field="body") == ["one", "two"]


def test_jsonl_errors_name_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    _write_jsonl(path, [{"text": "ok"}, {"body": "no text here"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: .*'text'"):
        load_texts(str(path))
    path.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        load_texts(str(path))
    _write_jsonl(path, [{"text": 3}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: field 'text' must be a string"):
        load_texts(str(path))
    _write_jsonl(path, [{"messages": [{"role": "user"}]}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: messages\[0\]"):
        load_texts(str(path))
    _write_jsonl(path, [["a list"]])
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: expected a JSON object"):
        load_texts(str(path))
    with pytest.raises(UserError, match="nowhere.jsonl.*no such file"):
        load_texts(str(tmp_path / "nowhere.jsonl"))


def test_datasets_folder_passes_the_split_through(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "train.jsonl", [{"text": "a b"}, {"text": "c"}])
    _write_jsonl(tmp_path / "test.jsonl", [{"text": "held out"}])
    assert load_texts(str(tmp_path)) == ["a b", "c"]
    assert load_texts(str(tmp_path), "test") == ["held out"]
    with pytest.raises(ValueError, match="no field 'body'.*'text'"):
        load_texts(str(tmp_path), text_field="body")


def _reference_blocks(tokenizer, texts: list[str], block_len: int, stride: int | None = None) -> list[list[int]]:
    stream: list[int] = []
    for i, text in enumerate(texts):
        if i:
            stream.append(tokenizer.eos_token_id)
        for word in text.split():  # word-level tokenizer without punctuation: one id per word
            stream.append(tokenizer.convert_tokens_to_ids(word))
    blocks = []
    for start in range(0, len(stream) - block_len + 1, stride or block_len):
        blocks.append(stream[start:start + block_len])
    return blocks


def test_token_blocks_match_an_explicit_loop() -> None:
    tokenizer = tiny_tokenizer()
    vocab = [w for w in tokenizer.get_vocab() if w.isalpha()]
    texts = [" ".join(vocab[i:i + 7 + i % 5]) for i in range(0, 60, 6)]
    expected = _reference_blocks(tokenizer, texts, 8)
    blocks = token_blocks(tokenizer, texts, 8)
    assert blocks.dtype == torch.long
    assert blocks.tolist() == expected
    # Asking for fewer blocks gives the leading ones.
    assert token_blocks(tokenizer, texts, 8, n_blocks=3).tolist() == expected[:3]
    for stride in (1, 3, 8):
        overlapping = _reference_blocks(tokenizer, texts, 8, stride)
        assert token_blocks(tokenizer, texts, 8, stride=stride).tolist() == overlapping
        assert token_blocks(tokenizer, texts, 8, n_blocks=4, stride=stride).tolist() == overlapping[:4]


def test_token_blocks_errors() -> None:
    tokenizer = tiny_tokenizer()
    with pytest.raises(ValueError, match="3 tokens.*block_len=4"):
        token_blocks(tokenizer, ["the", "of"], 4)  # two words and one EOS separator
    with pytest.raises(ValueError, match="n_blocks=5"):
        token_blocks(tokenizer, ["the " * 10], 4, n_blocks=5)
    with pytest.raises(ValueError, match="block_len"):
        token_blocks(tokenizer, ["the"], 0)
    with pytest.raises(ValueError, match="n_blocks"):
        token_blocks(tokenizer, ["the"], 1, n_blocks=0)
    for stride in (0, 5):
        with pytest.raises(ValueError, match=f"stride={stride}"):
            token_blocks(tokenizer, ["the " * 10], 4, stride=stride)


def test_token_blocks_needs_an_eos_token() -> None:
    tokenizer = tiny_tokenizer()
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="eos_token_id"):
        token_blocks(tokenizer, ["the of"], 1)


@pytest.mark.slow
def test_token_blocks_with_the_real_tokenizer_decode_to_the_text(smollm2) -> None:
    _, tokenizer = smollm2
    texts = load_texts(None, "heldout")
    blocks = token_blocks(tokenizer, texts, 256, n_blocks=4)
    assert blocks.shape == (4, 256)
    # The blocks are one consecutive stream: decoded, it is a prefix of the documents joined by EOS.
    decoded = tokenizer.decode(blocks.flatten())
    assert tokenizer.eos_token.join(texts).startswith(decoded)
    assert decoded.count(tokenizer.eos_token) >= 1 and len(decoded) > 2000
