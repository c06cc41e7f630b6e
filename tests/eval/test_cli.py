"""`kvtrain eval export` and `score`: items out, responses in, scores by kvtrain's checkers; errors in one line."""

from __future__ import annotations

import json

from kvtrain.cli import main


def test_export_then_score(tiny_dir, tmp_path, capsys):
    items = tmp_path / "items.jsonl"
    assert main(["eval", "export", "reasoning", "--model", str(tiny_dir), "--set", "chains=1",
                 "--set", "word_problems=1", "--out", str(items)]) == 0
    exported = [json.loads(line) for line in items.read_text().splitlines()]
    assert [e["id"] for e in exported] == ["chain-0", "word-0"]
    chain = exported[0]
    derivation = chain["checks"][1]["reference"]
    answers = [{"id": chain["id"], "response": f" {derivation} The answer is {chain['checks'][0]['reference']}.\n\nQ:"},
               {"id": exported[1]["id"], "response": " I do not know."}]
    responses = tmp_path / "responses.jsonl"
    responses.write_text("".join(json.dumps(a) + "\n" for a in answers))
    scores = tmp_path / "scores.jsonl"
    assert main(["eval", "score", "--items", str(items), "--responses", str(responses), "--out", str(scores)]) == 0
    rows = [json.loads(line) for line in scores.read_text().splitlines()]
    assert rows == [{"id": chain["id"], "answer": 1.0, "steps": 1.0}, {"id": exported[1]["id"], "answer": 0.0}]


def test_unknown_checker_in_items_is_one_line(tmp_path, capsys):
    record = {"id": "a", "suite": "x", "pieces": [["p", "Q"]], "prefill_pieces": 1, "max_new_tokens": 4,
              "checks": [{"name": "answer", "checker": "exact_match"}]}
    (tmp_path / "items.jsonl").write_text(json.dumps(record) + "\n")
    (tmp_path / "r.jsonl").write_text(json.dumps({"id": "a", "response": "x"}) + "\n")
    assert main(["eval", "score", "--items", str(tmp_path / "items.jsonl"), "--responses", str(tmp_path / "r.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown checker 'exact_match'" in err[0]
