"""`kvtrain publish` against a local Hub on 127.0.0.1 (`tests.hub.local_hub`, which speaks the HTTP calls
huggingface_hub 2.4 makes): the dry run sends nothing; a publish uploads the checkpoint, then the card; the
published repo loads back on "another machine" (a fresh cache, the base resolved through the Hub) and generates
the same tokens; every failure is one line and leaves no card; an interrupted upload resumes; the token never
appears in any output, log or file."""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

import kvtrain
from kvtrain.cli import main as cli
from kvtrain.eval.cache_bytes import cache_bytes
from kvtrain.hub.publish import Request, publish
from kvtrain.hub.validate import PublishError
from kvtrain.runtime.cache import CompressedCache
from tests.hub.conftest import BASE_REPO, TOKEN, closed_port, point_huggingface_hub_at, rewrite_json
from tests.hub.test_from_pretrained import greedy, prompt_ids

REPO_ID = "kvtrain-test/tiny-lora"
pytestmark = pytest.mark.timeout(180)


def request(checkpoint: Path, **changes) -> Request:
    settings = dict(checkpoint=checkpoint, repo_id=REPO_ID, base_model=BASE_REPO, license="mit", prompt_tokens=64,
                    new_tokens=8)
    return Request(**{**settings, **changes})


def front_matter(card: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", card, re.S)
    assert match, card[:200]
    return yaml.safe_load(match.group(1))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------- dry run
def test_dry_run_prints_the_files_and_the_card_and_sends_nothing(hub, lora_checkpoint, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN")  # a dry run needs no token
    code = cli(["publish", str(lora_checkpoint), "--repo-id", REPO_ID, "--dry-run", "--base-model", BASE_REPO,
                "--license", "mit", "--prompt-tokens", "64", "--new-tokens", "8"])
    out = capsys.readouterr().out
    assert code == 0 and hub.requests == []
    listing, card = out.split("\n\n---\n", 1)
    card = "---\n" + card
    files = re.findall(r"^ +[\d,]+  (\S+)", listing, re.M)
    assert files == ["adapter_config.json", "adapter_model.safetensors", "kvtrain_training.json", "tokenizer.json",
                     "tokenizer_config.json", "kv_compression/compression.json", "kv_compression/config.json",
                     "kv_compression/query_stats.safetensors", "README.md"]  # no training_args.bin; the card last
    assert "(base_model_name_or_path -> kvtrain-test/tiny-llama)" in listing

    metadata = front_matter(card)
    assert metadata == {
        "base_model": BASE_REPO, "base_model_relation": "adapter", "library_name": "kvtrain", "license": "mit",
        "pipeline_tag": "text-generation",
        "tags": ["kvtrain", "kv-cache-compression", "kv-expected_attention", "text-generation", "lora", "peft"],
    }
    assert f'kvtrain.from_pretrained("{REPO_ID}")' in card
    assert "keeps 8 tokens per KV head in every layer, always keeping the first 2 and the last 2 tokens" in card
    assert "| `kv_compression/query_stats.safetensors` |" in card and "| checked |" in card
    for name in ("adapter_model.safetensors", "tokenizer.json"):  # the card lists each file's sha256
        digest = sha256((lora_checkpoint / name).read_bytes())
        assert f"| `{name}` | {(lora_checkpoint / name).stat().st_size:,} | `{digest}` |" in card
    assert "| after training (this checkpoint) |" in card  # the loyalty training measured


def test_the_card_reports_the_bytes_the_compressed_cache_holds(lora_checkpoint, capsys):
    """Against a recount from the stored token counts: 2 (keys, values) x head_dim x 4 bytes per stored token."""
    plan = publish(request(lora_checkpoint), dry_run=True)
    loaded = kvtrain.from_pretrained(lora_checkpoint)
    ids = prompt_ids(loaded.tokenizer, 64)
    cache = CompressedCache.for_model(loaded.model, loaded.config)
    with torch.no_grad():
        loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                              max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    stored = sum(int(n.sum()) for n in cache.stored_tokens())
    nbytes, seen = stored * 2 * 8 * 4, 64 + 8 - 1
    assert nbytes < seen * 2 * 2 * 2 * 8 * 4  # compressed: fewer than a full cache's 256 bytes per token seen
    assert (f"({seen} tokens seen), the compressed cache held {nbytes:,} bytes, **{nbytes / seen:,.0f} bytes per "
            f"token seen** (float32 storage). A full cache of this model holds 256 bytes per token in float32 "
            f"({nbytes / seen / 256:.1%} of it here) and 128 bytes per token at 16 bits") in plan.card
    bookkeeping = round(cache_bytes(cache, loaded.model.config).bookkeeping * seen)
    assert bookkeeping > 0 and (f"the cache held {bookkeeping:,} bytes of bookkeeping ({bookkeeping / seen:,.0f} "
                                "per token seen") in plan.card


def test_an_evaluation_report_goes_into_the_card_and_under_eval(lora_checkpoint, tmp_path, capsys):
    report = tmp_path / "report"
    report.mkdir()
    (report / "results.md").write_text("# Results\n\n| kl | top1 |\n|---|---|\n| 0.1 | 0.9 |\n\n![curve](loss.png)\n")
    (report / "loss.png").write_bytes(b"\x89PNG fake")
    (report / "other.png").write_bytes(b"\x89PNG other")
    plan = publish(request(lora_checkpoint, eval_report=report), dry_run=True)
    assert [p for p in plan.files if p.startswith("eval/")] == ["eval/loss.png", "eval/other.png", "eval/results.md"]
    assert "### results.md\n\n### Results\n\n| kl | top1 |" in plan.card
    assert "![curve](eval/loss.png)" in plan.card and "![other](eval/other.png)" in plan.card


def test_without_any_evaluation_the_card_says_so(lora_checkpoint, copy_of):
    checkpoint = copy_of(lora_checkpoint)
    rewrite_json(checkpoint / "kvtrain_training.json", lambda metadata: metadata["metrics"].update(loyalty={}))
    plan = publish(request(checkpoint), dry_run=True)
    assert "## Evaluation\n\nNo evaluation is attached to this card.\n" in plan.card


# ---------------------------------------------------------------------------------------------- publishing
def test_publish_uploads_the_checkpoint_then_the_card_and_it_loads_back(hub_with_base, lora_checkpoint, tmp_path,
                                                                        monkeypatch, capsys):
    hub = hub_with_base
    plan = publish(request(lora_checkpoint))
    commits = hub.commits(REPO_ID)
    assert [c.message for c in commits[1:]] == ["kvtrain publish: weights and kv_compression/ (8 files)",
                                                "kvtrain publish: model card"]
    assert commits[-1].changed == ["README.md"] and "README.md" not in commits[1].files
    files = hub.files(REPO_ID)
    assert sorted(files) == sorted([".gitattributes", *plan.files])
    for name in ("adapter_model.safetensors", "kv_compression/query_stats.safetensors", "kv_compression/config.json"):
        assert files[name] == (lora_checkpoint / name).read_bytes()
    assert front_matter(files["README.md"].decode())["base_model"] == BASE_REPO
    assert "published kvtrain-test/tiny-lora (revision main)" in capsys.readouterr().out

    # Another machine: an empty Hugging Face cache, no local base folder named anywhere in the repo.
    point_huggingface_hub_at(monkeypatch, hub.url, tmp_path / "other-machine")
    remote = kvtrain.from_pretrained(REPO_ID)
    local = kvtrain.from_pretrained(lora_checkpoint)
    ids = prompt_ids(local.tokenizer)
    assert greedy(remote.model, ids, remote.new_cache()).tolist() == greedy(local.model, ids, local.new_cache()).tolist()
    assert any(r.path.startswith(f"/{BASE_REPO}/resolve/") for r in hub.requests)  # the base came from the Hub
    plain = AutoModelForCausalLM.from_pretrained(remote.path)  # transformers + peft: base from the Hub too
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, local.model(input_ids=ids).logits)


def test_publishing_again_changes_nothing(hub_with_base, lora_checkpoint):
    publish(request(lora_checkpoint))
    before = len(hub_with_base.commits(REPO_ID))
    publish(request(lora_checkpoint))
    assert len(hub_with_base.commits(REPO_ID)) == before


def test_step_branch_publishes_to_its_own_branch(hub_with_base, lora_checkpoint):
    plan = publish(request(lora_checkpoint, step_branch=True))
    assert plan.revision == "step-2"
    assert "README.md" in hub_with_base.files(REPO_ID, "step-2")
    assert sorted(hub_with_base.files(REPO_ID, "main")) == [".gitattributes"]
    assert kvtrain.from_pretrained(REPO_ID, revision="step-2").config.budget == 8


def test_a_merged_checkpoint_is_a_finetune_of_its_base(hub_with_base, merged_checkpoint):
    plan = publish(request(merged_checkpoint, repo_id="kvtrain-test/tiny-merged"))
    assert front_matter(plan.card)["base_model_relation"] == "finetune"
    assert "model.safetensors" in hub_with_base.files("kvtrain-test/tiny-merged")


# ---------------------------------------------------------------------------------------------- failures
def assert_one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_no_token(hub, lora_checkpoint, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(PublishError, match=r"^no Hugging Face token: set HF_TOKEN or log in with `hf auth login`") as err:
        publish(request(lora_checkpoint))
    assert_one_line(err)
    assert hub.requests == []


def test_a_refused_token(hub, lora_checkpoint, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_notTheRightOne")
    with pytest.raises(PublishError, match=r"refused the token while checking the token \(HTTP 401\)") as err:
        publish(request(lora_checkpoint))
    assert_one_line(err)
    assert hub.repos == {}


def test_no_network(lora_checkpoint, monkeypatch, tmp_path):
    port = closed_port()
    point_huggingface_hub_at(monkeypatch, f"http://127.0.0.1:{port}", tmp_path / "hf")
    with pytest.raises(PublishError, match=rf"^cannot reach the Hugging Face Hub at http://127.0.0.1:{port} while "
                                           r"checking the token \(ConnectError: ") as err:
        publish(request(lora_checkpoint))
    assert_one_line(err)


def test_a_repo_holding_another_base_model_is_refused(hub, lora_checkpoint):
    from huggingface_hub import HfApi

    api = HfApi(token=TOKEN)
    api.create_repo(REPO_ID)
    api.upload_file(repo_id=REPO_ID, path_in_repo="README.md",
                    path_or_fileobj=b"---\nbase_model: someone/other-model\nlicense: mit\n---\n# other\n")
    commits = len(hub.commits(REPO_ID))
    with pytest.raises(PublishError, match=r"^kvtrain-test/tiny-lora already holds a model card with base_model "
                                           r"'someone/other-model', and this checkpoint's base is "
                                           r"'kvtrain-test/tiny-llama': publish it to another repo id") as err:
        publish(request(lora_checkpoint))
    assert_one_line(err)
    assert len(hub.commits(REPO_ID)) == commits


def test_private_asked_for_an_existing_public_repo_is_refused(hub, lora_checkpoint):
    from huggingface_hub import HfApi

    HfApi(token=TOKEN).create_repo(REPO_ID)
    with pytest.raises(PublishError, match=r"exists and is public; --private would not change that"):
        publish(request(lora_checkpoint, private=True))


def test_missing_artifacts_are_refused_before_anything_is_created(hub, lora_checkpoint, copy_of):
    checkpoint = copy_of(lora_checkpoint)
    (checkpoint / "kv_compression" / "query_stats.safetensors").unlink()
    with pytest.raises(PublishError, match=r"not publishable: .*kv_compression/query_stats.safetensors is missing") as err:
        publish(request(checkpoint))
    assert_one_line(err)
    assert hub.repos == {}


def test_a_lora_on_a_local_base_needs_a_hub_base(lora_checkpoint):
    with pytest.raises(PublishError, match=r"base_model '.*tiny-base.*' is a local folder, which other machines "
                                           r"cannot load: pass --base-model ORG/NAME"):
        publish(request(lora_checkpoint, base_model=None), dry_run=True)


def test_the_command_line_reports_one_line_and_exit_code_2(hub, lora_checkpoint, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN")
    code = cli(["publish", str(lora_checkpoint), "--repo-id", REPO_ID, "--base-model", BASE_REPO, "--license", "mit"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("kvtrain: error: no Hugging Face token")


def test_an_interrupted_upload_leaves_no_card_and_resumes(hub_with_base, lora_checkpoint):
    hub = hub_with_base
    hub.fail_commit = lambda repo, revision, paths: "README.md" in paths  # the network dies before the card
    with pytest.raises(PublishError, match=r"while uploading the card to kvtrain-test/tiny-lora .*; the card is not "
                                           r"uploaded, so the repo does not look complete: re-run the same command "
                                           r"to resume") as err:
        publish(request(lora_checkpoint))
    assert_one_line(err)
    assert "README.md" not in hub.files(REPO_ID) and "adapter_model.safetensors" in hub.files(REPO_ID)
    from huggingface_hub import HfApi

    assert HfApi(token=TOKEN).model_info(REPO_ID).card_data is None

    hub.fail_commit = None
    hub.requests.clear()
    publish(request(lora_checkpoint))
    commits = hub.commits(REPO_ID)
    assert [c.changed for c in commits[2:]] == [["README.md"]]  # the re-run sent the card only
    assert sum(r.path.endswith("/commit/main") for r in hub.requests) == 1


def test_an_interrupted_update_removes_the_old_card_first(hub_with_base, lora_checkpoint):
    """A repo holding a finished publish gets a new card: the first commit takes the old card away, so if the
    upload stops before the new card, the repo shows none rather than the old one over new files."""
    hub = hub_with_base
    publish(request(lora_checkpoint))
    hub.fail_commit = lambda repo, revision, paths: paths == ["README.md"]
    with pytest.raises(PublishError, match="re-run the same command to resume"):
        publish(request(lora_checkpoint, license="apache-2.0"))
    assert "README.md" not in hub.files(REPO_ID)
    hub.fail_commit = None
    publish(request(lora_checkpoint, license="apache-2.0"))
    assert front_matter(hub.files(REPO_ID)["README.md"].decode())["license"] == "apache-2.0"


def test_a_failure_before_the_first_commit_commits_nothing_and_resumes(hub_with_base, lora_checkpoint):
    hub = hub_with_base
    hub.fail_commit = lambda repo, revision, paths: True
    with pytest.raises(PublishError, match=r"while uploading to kvtrain-test/tiny-lora"):
        publish(request(lora_checkpoint))
    assert sorted(hub.files(REPO_ID)) == [".gitattributes"]
    hub.fail_commit = None
    publish(request(lora_checkpoint))
    assert "README.md" in hub.files(REPO_ID)


# ---------------------------------------------------------------------------------------------- the token
def test_the_token_never_appears_in_output_logs_or_files(hub_with_base, lora_checkpoint, tmp_path, monkeypatch,
                                                        capfd, caplog):
    import tempfile

    from huggingface_hub.utils import logging as hf_logging

    staging = tmp_path / "tmp"
    staging.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))  # staged uploads land where the scan looks
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_DEBUG", True)  # huggingface_hub logs every request as a curl command
    hf_logging.set_verbosity_debug()
    caplog.set_level(logging.DEBUG)
    try:
        hub_with_base.fail_commit = lambda repo, revision, paths: "README.md" in paths
        with pytest.raises(PublishError):
            publish(request(lora_checkpoint))
        hub_with_base.fail_commit = None
        publish(request(lora_checkpoint))
        cli(["publish", str(lora_checkpoint), "--repo-id", REPO_ID, "--base-model", BASE_REPO, "--license", "mit",
             "--dry-run", "--prompt-tokens", "64"])
        kvtrain.from_pretrained(REPO_ID)
    finally:
        hf_logging.set_verbosity_warning()
    assert all(r.authorized for r in hub_with_base.requests if "/commit/" in r.path)  # the token was used
    captured = capfd.readouterr()
    assert "Send: curl" in caplog.text and "-H 'authorization: <TOKEN>'" in caplog.text  # the debug log was on
    assert TOKEN not in captured.out + captured.err + caplog.text
    assert list(staging.iterdir()) == []  # the staging folder is removed
    scanned = [p for root in (tmp_path, lora_checkpoint) for p in root.rglob("*") if p.is_file()]
    assert len(scanned) > 20
    assert [p for p in scanned if TOKEN.encode() in p.read_bytes()] == []
    hub_files = [data for repo in hub_with_base.repos for data in hub_with_base.files(repo).values()]
    assert not any(TOKEN.encode() in data for data in hub_files)

