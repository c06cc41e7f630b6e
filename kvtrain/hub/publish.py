"""`kvtrain publish`: put a compression-ready checkpoint on the Hugging Face Hub, card last.

1. Cheap checks first: the repo id, the base model a card can name (a Hub id; a local base folder needs
   ``--base-model``), its license, the evaluation report, the token (``HF_TOKEN`` or the login cache).
2. With the network: who the token belongs to, and whether the repo already holds another base model's card.
3. The checkpoint is loaded and run as a user will (`kvtrain.hub.validate.check_checkpoint`).
4. The files to upload are staged (links to the checkpoint's files, plus the rewritten ones: the card,
   ``adapter_config.json`` and ``kvtrain_training.json`` naming the published base), then uploaded with
   `HfApi.upload_folder` in two calls: everything but ``README.md``, then ``README.md``. A repo without its
   card is not finished, and a re-run of the same command resumes (files already on the Hub are skipped by
   huggingface_hub). When the repo holds an older, different card, the first commit removes it, so a
   half-updated repo never shows a card either.

The token goes to `HfApi` and nowhere else: it is never printed, logged or written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from kvtrain.artifacts.checkpoint import ARTIFACT_DIR, MANIFEST, TRAINING_METADATA, read_training_metadata
from kvtrain.hub.card import BaseModel, EvalReport, model_card
from kvtrain.io import MANIFEST as OUTPUT_MANIFEST
from kvtrain.hub.validate import CheckedCheckpoint, PublishError, check_checkpoint, training_step
from kvtrain.models import EMBEDDED_ORIGINS
from kvtrain.runtime.pretrained import ADAPTER_CONFIG, is_local_path

CARD = "README.md"
# A pickle of the TrainingArguments (it may hold a token passed as an argument); kvtrain_training.json has the
# same arguments as JSON with tokens redacted.
# The output manifest names the local files; the card lists the sha256 of the uploaded ones (some rewritten).
NOT_PUBLISHED = {"training_args.bin", CARD, OUTPUT_MANIFEST}
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class PublishPlan:
    """What one `kvtrain publish` call uploads, in order (the card last)."""

    checked: CheckedCheckpoint
    repo_id: str
    revision: str
    private: bool
    base: BaseModel
    files: dict[str, Path | bytes]  # path in the repo -> a checkpoint file or new content; README.md last
    notes: dict[str, str] = field(default_factory=dict)  # path -> why its content differs from the checkpoint's

    @property
    def card(self) -> str:
        return self.files[CARD].decode()


@dataclass(frozen=True)
class Request:
    """The command line's arguments, checked before anything heavy runs."""

    checkpoint: Path
    repo_id: str
    revision: str | None = None
    step_branch: bool = False
    private: bool = False
    base_model: str | None = None
    license: str | None = None
    eval_report: Path | None = None
    prompt_tokens: int = 512
    new_tokens: int = 16


def publish(request: Request, *, dry_run: bool = False, out=None) -> PublishPlan:
    """Check, plan and (unless `dry_run`) upload; returns the plan. Errors are PublishError, one line each.
    Reports go to `out` (default: standard output)."""
    out = out or sys.stdout
    base, report, revision = _early_checks(request)
    api = None
    if not dry_run:
        api = _authenticated_api()
        _check_remote(api, request, revision, base)
    checked = check_checkpoint(request.checkpoint, prompt_tokens=request.prompt_tokens, new_tokens=request.new_tokens)
    plan = _plan(checked, request, revision, base, report)
    if dry_run:
        print(describe(plan), file=out)
        print(plan.card, file=out)
        return plan
    _upload(api, plan, out)
    return plan


def describe(plan: PublishPlan) -> str:
    """The dry run's report: where the files would go and what they are, in upload order."""
    checked = plan.checked
    lines = [
        f"kvtrain publish (dry run): {checked.folder} -> {plan.repo_id} (revision {plan.revision}, "
        f"{'private' if plan.private else 'public'}); nothing was sent",
        f"checked: the weights and tokenizer load; sha256 of the {_count(checked.files, 'file')} of "
        f"kv_compression/; the model fingerprint of the bundle and of {_count(checked.fingerprinted, 'artifact')}; "
        f"{checked.measure.new_tokens} greedy tokens under the compressed cache",
        "files, in upload order (the card last):",
    ]
    for path, source in plan.files.items():
        size = len(source) if isinstance(source, bytes) else source.stat().st_size
        note = f"  ({plan.notes[path]})" if path in plan.notes else ""
        lines.append(f"  {size:>12,}  {path}{note}")
    return "\n".join(lines) + "\n"


def _count(items, noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


# ---------------------------------------------------------------------------------------------- checks
def _early_checks(request: Request):
    """Everything that needs neither the network nor the model: (base, report, revision)."""
    if not REPO_ID.match(request.repo_id) or ".." in request.repo_id:
        raise PublishError(f"--repo-id {request.repo_id!r}: expected ORG/NAME (letters, digits, '-', '_', '.')")
    if request.revision is not None and request.step_branch:
        raise PublishError("--revision and --step-branch both name the branch: pass one")
    if not request.checkpoint.is_dir():
        raise PublishError(f"{request.checkpoint}: no such checkpoint folder")
    for name in ("prompt_tokens", "new_tokens"):
        if getattr(request, name) < 1:
            raise PublishError(f"--{name.replace('_', '-')} {getattr(request, name)}: must be at least 1")
    try:
        metadata = read_training_metadata(request.checkpoint)
    except ValueError as err:
        raise PublishError(str(err)) from None
    base = published_base(request.checkpoint, metadata, request.base_model, request.license)
    report = read_eval_report(request.eval_report) if request.eval_report is not None else None
    revision = request.revision or "main"
    if request.step_branch:
        step = training_step(metadata)
        if step is None:
            raise PublishError(f"{request.checkpoint / TRAINING_METADATA}: no training step recorded; "
                               "--step-branch needs one (or pass --revision)")
        revision = f"step-{step}"
    if not re.fullmatch(r"[\w.][\w./-]*", revision) or ".." in revision:
        raise PublishError(f"--revision {revision!r}: not a branch name")
    return base, report, revision


def published_base(checkpoint: Path, metadata: dict, override: str | None, license: str | None) -> BaseModel:
    """The base model a card names (a Hub id) and its license; refused when another machine could not load it."""
    recorded = metadata.get("base_model")
    embedded = recorded in EMBEDDED_ORIGINS
    local = not embedded and (not isinstance(recorded, str) or is_local_path(recorded)
                              or Path(recorded).expanduser().is_dir())
    if override is not None:
        if not REPO_ID.match(override):
            raise PublishError(f"--base-model {override!r}: expected a Hub repo id ORG/NAME")
        hub_id = override
    elif embedded:
        hub_id = EMBEDDED_ORIGINS[recorded][0]
    elif local:
        raise PublishError(
            f"{checkpoint / TRAINING_METADATA}: base_model {recorded!r} is a local folder, which other machines "
            "cannot load: pass --base-model ORG/NAME naming the same weights on the Hub"
        )
    else:
        hub_id = recorded
    origin_license = EMBEDDED_ORIGINS[recorded][1] if embedded and hub_id == EMBEDDED_ORIGINS[recorded][0] else None
    license = license or origin_license or _card_license(recorded if local else None, hub_id)
    if not license:
        raise PublishError(f"cannot tell the license of the base model {hub_id} (its model card is not on this "
                           "machine): pass --license, e.g. apache-2.0, mit, llama3.1 or other")
    return BaseModel(recorded=str(recorded), hub_id=hub_id, license=license, embedded=embedded, local=local)


def _card_license(recorded: str | None, hub_id: str) -> str | None:
    """The license in the base model's card, read from its local folder or the Hugging Face cache (no network)."""
    from huggingface_hub import ModelCard, try_to_load_from_cache

    candidates = []
    if recorded and Path(recorded).expanduser().is_dir():
        candidates.append(Path(recorded).expanduser() / CARD)
    cached = try_to_load_from_cache(hub_id, CARD)
    if isinstance(cached, str):
        candidates.append(Path(cached))
    for path in candidates:
        if path.is_file():
            license = ModelCard.load(path).data.license
            if license:
                return str(license)
    return None


def read_eval_report(path: Path) -> EvalReport:
    """An evaluation report to attach: a markdown file, or a folder of markdown and PNG files (top level)."""
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in (".md", ".png"))
    else:
        raise PublishError(f"--eval-report {path}: no such file or folder")
    markdown = {p.name: p.read_text(encoding="utf-8") for p in files if p.suffix.lower() == ".md"}
    if not files or (path.is_file() and not markdown):
        raise PublishError(f"--eval-report {path}: expected a markdown file or a folder with .md/.png files")
    return EvalReport(markdown, files)


# ---------------------------------------------------------------------------------------------- plan
def _plan(checked: CheckedCheckpoint, request: Request, revision: str, base: BaseModel,
          report: EvalReport | None) -> PublishPlan:
    folder = checked.folder
    files: dict[str, Path | bytes] = {}
    notes: dict[str, str] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.name not in NOT_PUBLISHED:
            files[path.name] = path
    for name in sorted([*checked.files, MANIFEST]):
        files[f"{ARTIFACT_DIR}/{name}"] = folder / ARTIFACT_DIR / name
    if checked.is_adapter:
        adapter = json.loads((folder / ADAPTER_CONFIG).read_text())
        if adapter.get("base_model_name_or_path") != base.hub_id:
            adapter["base_model_name_or_path"] = base.hub_id
            files[ADAPTER_CONFIG] = (json.dumps(adapter, indent=2, sort_keys=True) + "\n").encode()
            notes[ADAPTER_CONFIG] = f"base_model_name_or_path -> {base.hub_id}"
    if base.local:  # the folder training read exists only on this machine: name the Hub copy instead
        metadata = {**checked.metadata, "base_model": base.hub_id}
        files[TRAINING_METADATA] = json.dumps(metadata, indent=2, default=str).encode()
        notes[TRAINING_METADATA] = f"base_model -> {base.hub_id}"
    for path in report.files if report is not None else []:
        files[f"eval/{path.name}"] = path
    listing = {name: _size_and_sha256(source) for name, source in files.items()}
    card = model_card(checked, repo_id=request.repo_id, base=base, report=report, files=listing)
    files[CARD] = str(card).encode()
    notes[CARD] = "the model card, printed below"
    return PublishPlan(checked, request.repo_id, revision, request.private, base, files, notes)


def _size_and_sha256(source: Path | bytes) -> tuple[int, str]:
    if isinstance(source, bytes):
        return len(source), hashlib.sha256(source).hexdigest()
    digest = hashlib.sha256()
    with open(source, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return source.stat().st_size, digest.hexdigest()


def git_blob_sha1(data: bytes) -> str:
    """The id git (and the Hub) gives a file of these bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# ---------------------------------------------------------------------------------------------- network
def _authenticated_api():
    """An `HfApi` holding the token of the environment or the login cache, checked with `whoami`."""
    from huggingface_hub import HfApi, get_token

    token = get_token()
    if not token:
        raise PublishError("no Hugging Face token: set HF_TOKEN or log in with `hf auth login` (--dry-run needs none)")
    api = HfApi(token=token)
    _hub_call(api, "checking the token", api.whoami)
    return api


def _check_remote(api, request: Request, revision: str, base: BaseModel) -> None:
    """Refuse a repo that holds another base model's card, or that is public when --private was asked."""
    from huggingface_hub.errors import RevisionNotFoundError

    def info():
        try:
            return api.model_info(request.repo_id, revision=revision)
        except RevisionNotFoundError:  # a new branch starts from main
            return api.model_info(request.repo_id)

    try:
        existing = _hub_call(api, f"reading {request.repo_id}", info)
    except _Missing:
        return
    if request.private and existing.private is False:
        raise PublishError(f"{request.repo_id} exists and is public; --private would not change that: drop "
                           "--private or change the repo's visibility on the Hub first")
    card = existing.card_data
    theirs = card.base_model if card is not None else None
    if theirs is not None and (theirs if isinstance(theirs, list) else [theirs]) != [base.hub_id]:
        raise PublishError(f"{request.repo_id} already holds a model card with base_model {theirs!r}, and this "
                           f"checkpoint's base is {base.hub_id!r}: publish it to another repo id")


class _Missing(Exception):
    """The repo does not exist (yet)."""


def _hub_call(api, what: str, call, *, interrupted: bool = False):
    """`call()`, with the Hub's and the network's failures turned into one-line PublishErrors."""
    import httpx2  # huggingface_hub 2.4's HTTP client: its transport errors are what a missing network raises
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

    resume = ("; the card is not uploaded, so the repo does not look complete: re-run the same command to "
              "resume (files already on the Hub are skipped)") if interrupted else ""
    try:
        return call()
    except RepositoryNotFoundError:
        if interrupted:
            raise PublishError(f"{what}: the Hub at {api.endpoint} no longer has the repo{resume}") from None
        raise _Missing() from None
    except OfflineModeIsEnabled:
        raise PublishError(f"HF_HUB_OFFLINE is set: publishing needs the network (unset it, or use --dry-run)"
                           f"{resume}") from None
    except httpx2.TransportError as err:
        raise PublishError(f"cannot reach the Hugging Face Hub at {api.endpoint} while {what} "
                           f"({type(err).__name__}: {_first_line(err)}){resume}") from None
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else "?"
        if status in (401, 403):
            raise PublishError(f"the Hub at {api.endpoint} refused the token while {what} (HTTP {status}): set a "
                               f"valid HF_TOKEN with write access or run `hf auth login --force`{resume}") from None
        raise PublishError(f"the Hub at {api.endpoint} answered HTTP {status} while {what} "
                           f"({_first_line(err)}){resume}") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _upload(api, plan: PublishPlan, out) -> None:
    repo_id, revision = plan.repo_id, plan.revision
    _hub_call(api, f"creating {repo_id}", lambda: api.create_repo(repo_id, private=plan.private, exist_ok=True))
    if revision != "main":
        _hub_call(api, f"creating branch {revision}", lambda: api.create_branch(repo_id, branch=revision, exist_ok=True))
    stage = Path(tempfile.mkdtemp(prefix="kvtrain-publish-"))
    try:
        for path, source in plan.files.items():
            target = stage / path
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(source, bytes):
                target.write_bytes(source)
            else:
                os.symlink(source.resolve(), target)
        stale_card = _remote_card_differs(api, plan)
        print(f"uploading {len(plan.files) - 1} files to {repo_id} (revision {revision}), then the card", file=out)
        _hub_call(api, f"uploading to {repo_id}", interrupted=True, call=lambda: api.upload_folder(
            repo_id=repo_id, folder_path=stage, revision=revision, ignore_patterns=[CARD],
            delete_patterns=[CARD] if stale_card else None,
            commit_message=f"kvtrain publish: weights and {ARTIFACT_DIR}/ ({len(plan.files) - 1} files)"))
        _hub_call(api, f"uploading the card to {repo_id}", interrupted=True, call=lambda: api.upload_folder(
            repo_id=repo_id, folder_path=stage, revision=revision, allow_patterns=[CARD],
            commit_message="kvtrain publish: model card"))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    suffix = "" if revision == "main" else f"/tree/{revision}"
    print(f"published {repo_id} (revision {revision}): {api.endpoint}/{repo_id}{suffix}", file=out)


def _remote_card_differs(api, plan: PublishPlan) -> bool:
    """Whether the revision holds a card other than the one this upload ends with."""
    from huggingface_hub import RepoFile

    tree = _hub_call(api, f"listing {plan.repo_id}", interrupted=True,
                     call=lambda: list(api.list_repo_tree(plan.repo_id, revision=plan.revision)))
    remote = next((f for f in tree if isinstance(f, RepoFile) and f.path == CARD), None)
    return remote is not None and remote.blob_id != git_blob_sha1(plan.files[CARD])
