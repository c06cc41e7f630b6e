"""The `kvtrain` lm-eval model type on a tiny model with a local task YAML and a local data file (offline)."""

from __future__ import annotations

import json
import math

import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from kvtrain.eval.lm_eval_adapter import KVTrainLM  # noqa: E402  (registers the model type)
from tests.eval.conftest import evict_config  # noqa: E402

QUESTIONS = [{"question": "the value of the", "answer": "object", "choices": ["object", "class"], "label": 0},
             {"question": "a list of", "answer": "the", "choices": ["the", "list"], "label": 1}]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (folder / "gen.yaml").write_text(
        "task: kvtrain_tiny_gen\n" + common + "output_type: generate_until\ndoc_to_text: '{{question}}'\n"
        "doc_to_target: ' {{answer}}'\ngeneration_kwargs:\n  until: ['\\n']\n  max_gen_toks: 4\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    (folder / "choice.yaml").write_text(
        "task: kvtrain_tiny_choice\n" + common + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n")
    return folder


@pytest.fixture(scope="module")
def kv_config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("kv") / "c.yaml"
    evict_config(compression_ratio=0.5, schedule={"interval": 2}).save(path)
    return path


def test_simple_evaluate_runs_local_tasks_under_compression(task_dir, kv_config_file, tiny_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    results = lm_eval.simple_evaluate(
        model="kvtrain", model_args={"pretrained": str(tiny_dir), "kv_config": str(kv_config_file)},
        tasks=["kvtrain_tiny_gen", "kvtrain_tiny_choice"], task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        log_samples=True, bootstrap_iters=0)
    assert results is not None
    gen = results["results"]["kvtrain_tiny_gen"]["exact_match,none"]
    acc = results["results"]["kvtrain_tiny_choice"]["acc,none"]
    assert 0.0 <= gen <= 1.0 and 0.0 <= acc <= 1.0
    samples = results["samples"]["kvtrain_tiny_gen"]
    assert len(samples) == 2 and all(isinstance(s["resps"][0][0], str) for s in samples)


def test_loglikelihood_by_replay_equals_decoding_through_the_cache(kv_config_file, tiny_dir):
    requests = [Instance("loglikelihood", {}, ("the value of the object is", " a list of the"), 0),
                Instance("loglikelihood", {}, ("", " the class"), 1)]
    replay = KVTrainLM(pretrained=str(tiny_dir), kv_config=str(kv_config_file)).loglikelihood(requests)
    cache = KVTrainLM(pretrained=str(tiny_dir), kv_config=str(kv_config_file),
                      loglikelihood="cache").loglikelihood(requests)
    full = KVTrainLM(pretrained=str(tiny_dir), kv_config="none").loglikelihood(requests)
    for (a, greedy_a), (b, greedy_b) in zip(replay, cache):
        assert math.isfinite(a) and a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b
    assert replay[0][0] != pytest.approx(full[0][0], abs=1e-6)  # compression changed the score


def test_generation_matches_generate_with_a_compressed_cache(kv_config_file, tiny, tiny_dir):
    import torch

    from kvtrain import CompressedCache, KVCompressionConfig

    lm = KVTrainLM(pretrained=str(tiny_dir), kv_config=str(kv_config_file))
    context = "the value of the object is a list of the"
    (text,) = lm.generate_until([Instance("generate_until", {}, (context, {"until": ["\n"], "max_gen_toks": 6}), 0)])
    model, tokenizer = tiny
    ids = torch.tensor([tokenizer.encode(context, add_special_tokens=False)])
    cache = CompressedCache.for_model(model, KVCompressionConfig.load(kv_config_file))
    out = model.generate(input_ids=ids, past_key_values=cache, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert text == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0]


def test_bad_model_args_are_named(tiny_dir):
    from kvtrain import ConfigError

    with pytest.raises(ConfigError, match=r"model_args \['kv_cfg'\]: not arguments of the kvtrain model type"):
        KVTrainLM(pretrained=str(tiny_dir), kv_cfg="x.yaml")
    with pytest.raises(ConfigError, match=r"loglikelihood='exact'"):
        KVTrainLM(pretrained=str(tiny_dir), loglikelihood="exact")


@pytest.mark.slow  # lm-eval's command line indexes its ~10k built-in task files first (about a minute here)
def test_kvtrain_cli_hands_the_command_line_to_lm_eval(task_dir, kv_config_file, tiny_dir, tmp_path, monkeypatch):
    from kvtrain.cli import main

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "results"
    main(["eval", "lm-eval", "run", "--model", "kvtrain", "--model_args",
          f"pretrained={tiny_dir},kv_config={kv_config_file}", "--tasks", "kvtrain_tiny_choice",
          "--include_path", str(task_dir), "--output_path", str(out)])
    (written,) = out.rglob("results_*.json")
    assert "acc,none" in json.loads(written.read_text())["results"]["kvtrain_tiny_choice"]
