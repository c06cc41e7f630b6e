"""`kvtrain eval sweep`: every suite for every method x budget (and checkpoint) of a YAML grid, resumable.

Grid::

    model: smollm2-135m            # the base model; its full cache is the reference of every suite
    artifacts: runs/eval/calib     # calibration folder for presets with low-rank projections
    budgets: [low, mid, high]
    methods:                       # presets (kvtrain.eval.presets), or mappings
      - snapkv
      - {preset: snapkv+keepkv, suites: {instructions: {fixes: [none]}}}   # preset with overrides
      - {preset: tada, config: {quant: {group_size: 16}}}
      - {name: mine, config: {scorer: {name: tova}, budget: null}, budgets: {low: {compression_ratio: 0.5}, ...}}
    checkpoints:                   # optional: trained models, each under the compression it was trained for;
      gkv-distilled: runs/distill/gkv   # the base model is also run under that compression (or `base_config`)
    suites: {perplexity: {blocks: 2}, retrieval: {}, instructions: {fixes: [none]}, ...}

Each finished cell (model, method, budget, suite) is appended to `OUT/results.jsonl` at once, atomically (the
file is replaced, never half-written), so a sweep killed at any point resumes where it stopped; a cell already
there is not run again (if the grid changed its configuration or options, that is an error naming the cell).
The whole grid is validated before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kvtrain.config import ConfigError, KVCompressionConfig
from kvtrain.eval.items import read_jsonl
from kvtrain.eval.loading import check_checkpoint, check_suite_limits, checkpoint_config, load_for_eval
from kvtrain.eval.presets import NEEDS_ARTIFACTS, PRESETS, fill_artifacts, merge
from kvtrain.eval.report import provenance
from kvtrain.eval.suites import get_suite
from kvtrain.io import atomic_write_text, owned_folder, parse_error_line

logger = logging.getLogger("kvtrain")

RESULTS = "results.jsonl"
PROVENANCE = "provenance.json"
FULL = "full"
_GRID_KEYS = {"model", "artifacts", "budgets", "methods", "checkpoints", "suites"}


@dataclass
class Cell:
    model: str  # label: "base", or a checkpoint's name
    source: str  # what to load
    method: str
    budget: str
    suite: str
    config: dict[str, Any] | None  # KVCompressionConfig mapping; None = the full cache
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str, str, str]:
        return self.model, self.method, self.budget, self.suite

    def describe(self) -> str:
        return f"{self.model}/{self.method}/{self.budget}/{self.suite}"


def _fail(source: str, where: str, message: str):

    raise ConfigError(f"{source}: {where}: {message}")


def _method_specs(grid: dict, source: str) -> list[tuple[str, dict, dict, dict]]:
    """(name, base config mapping, budget -> overrides, suite option overrides) of every method."""
    specs = []
    for i, entry in enumerate(grid.get("methods") or []):
        where = f"methods[{i}]"
        if isinstance(entry, str):
            entry = {"preset": entry}
        if not isinstance(entry, dict):
            _fail(source, where, f"{entry!r} must be a preset name or a mapping")
        unknown = set(entry) - {"preset", "name", "config", "budgets", "suites"}
        if unknown:
            _fail(source, where, f"unknown field(s) {sorted(unknown)}; fields: preset, name, config, budgets, suites")
        if "preset" in entry:
            name = entry["preset"]
            if name not in PRESETS:
                _fail(source, where, f"unknown method {name!r}; presets: {', '.join(PRESETS)} (or give a mapping "
                      "with name, config and budgets)")
            if name in NEEDS_ARTIFACTS and not grid.get("artifacts"):
                _fail(source, where, f"method {name!r} needs calibration artifacts: set 'artifacts' "
                      "(a `kvtrain calibrate --fit kqsvd --rank 32` output folder)")
            preset = PRESETS[name]
            config = merge(preset["config"], entry.get("config") or {})
            budgets = {**preset["budgets"], **(entry.get("budgets") or {})}
            name = entry.get("name", name)
        else:
            if not {"name", "config", "budgets"} <= set(entry):
                _fail(source, where, "a method mapping needs 'name', 'config' and 'budgets' (or a 'preset')")
            name, config, budgets = entry["name"], entry["config"], entry["budgets"]
        specs.append((name, config, budgets, entry.get("suites") or {}))
    names = [s[0] for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        _fail(source, "methods", f"method name(s) {duplicates} appear twice")
    return specs


def load_grid(path: str | Path) -> list[Cell]:
    """The cells of a grid file, in run order (per model: the full cache first), every config validated."""
    source = str(path)
    try:
        grid = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        _fail(source, "grid", f"cannot read ({err.strerror})")
    except yaml.YAMLError as err:
        _fail(source, "grid", f"not valid YAML ({parse_error_line(err)})")
    if not isinstance(grid, dict):
        _fail(source, "grid", "expected a mapping at the top level")
    unknown = set(grid) - _GRID_KEYS
    if unknown:
        _fail(source, "grid", f"unknown field(s) {sorted(unknown)}; fields: {sorted(_GRID_KEYS)}")
    suites = grid.get("suites")
    if not isinstance(suites, dict) or not suites:
        _fail(source, "suites", "give a mapping of suite names to their options")
    for name, options in suites.items():
        get_suite(name).parse_options(options, f"{source}: suites.{name}")
    budgets = [str(b) for b in grid.get("budgets") or []]
    base = str(grid.get("model", "smollm2-135m"))
    artifacts = str(grid.get("artifacts", ""))
    cells = [Cell("base", base, FULL, "-", suite, None, _plain(options or {})) for suite, options in suites.items()]

    def add(model: str, src: str, method: str, budget: str, config: dict, suite_overrides: dict, where: str):
        config = KVCompressionConfig.from_dict(fill_artifacts(config, artifacts), source=f"{source}: {where}")
        for file in _referenced_files(config):
            if not Path(file).exists():
                _fail(source, where, f"file {file!r} does not exist (run `kvtrain calibrate` first?)")
        for suite, options in suites.items():
            merged = merge(options or {}, suite_overrides.get(suite) or {})
            get_suite(suite).parse_options(merged, f"{source}: {where}: suites.{suite}")
            cells.append(Cell(model, src, method, budget, suite, _plain(config.to_dict()), _plain(merged)))

    for name, config, method_budgets, overrides in _method_specs(grid, source):
        for budget in budgets:
            if budget not in method_budgets:
                _fail(source, f"methods.{name}", f"no settings for budget {budget!r}; it has {sorted(method_budgets)}")
            add("base", base, name, budget, merge(config, method_budgets[budget]), overrides,
                f"methods.{name}.budgets.{budget}")
    for name, entry in (grid.get("checkpoints") or {}).items():
        entry = {"path": entry} if isinstance(entry, str) else entry
        where = f"checkpoints.{name}"
        if not isinstance(entry, dict) or "path" not in entry:
            _fail(source, where, "give a checkpoint folder, or a mapping with 'path' (and optional 'base_config')")
        check_checkpoint(entry["path"], f"{where}:")
        trained = checkpoint_config(entry["path"]).to_dict()
        base_config = KVCompressionConfig.load(entry["base_config"]).to_dict() if entry.get("base_config") else trained
        add(name, str(entry["path"]), name, "trained", trained, {}, where)
        add("base", base, name, "trained", base_config, {}, f"{where} (base model)")
    return cells


def _plain(data: dict[str, Any]) -> dict[str, Any]:
    """As it reads back from JSON (tuples become lists), so a resumed sweep compares like with like."""
    return json.loads(json.dumps(data))


def _referenced_files(config) -> list[str]:
    files = []
    if config.lowrank is not None:
        files.append(config.lowrank.projections)
    if config.quant is not None and config.quant.plan:
        files.append(config.quant.plan)
    if config.sals is not None:
        files.append(config.sals.basis)
    return files


# ------------------------------------------------------------------ results file
def read_results(out: str | Path) -> list[dict[str, Any]]:

    path = Path(out) / RESULTS
    return read_jsonl(path) if path.is_file() else []


def append_result(out: str | Path, record: dict[str, Any]) -> None:
    """Add one record to `results.jsonl`, replacing the file atomically: a kill leaves the old or the new file."""
    path = Path(out) / RESULTS
    before = path.read_text(encoding="utf-8") if path.is_file() else ""
    atomic_write_text(path, before + json.dumps(record, sort_keys=True) + "\n")


def _done(records: list[dict[str, Any]], cells: list[Cell], out: Path) -> set[tuple]:

    by_key = {(r["model"], r["method"], r["budget"], r["suite"]): r for r in records}
    for cell in cells:
        record = by_key.get(cell.key)
        if record is not None and (record["config"] != cell.config or record["options"] != cell.options):
            raise ConfigError(f"{out / RESULTS}: cell {cell.describe()} was run with another configuration or "
                              "other options than the grid now gives; use a new --out or delete that line")
    return set(by_key)


def run_sweep(grid_path: str | Path, out: str | Path, *, progress: bool = True, after_cell=None) -> list[dict]:
    """Run every cell of the grid not yet in `out/results.jsonl`; returns all records.

    `after_cell(record)` is called after each cell is saved (tests use it to interrupt a sweep).
    """
    from tqdm.auto import tqdm


    out = Path(out)
    cells = load_grid(grid_path)
    checked = set()
    for cell in cells:  # each model's suite options against its positions and the memory, before any model loads
        key = (cell.source, cell.suite, json.dumps(cell.options, sort_keys=True))
        if key not in checked:
            checked.add(key)
            suite = get_suite(cell.suite)
            check_suite_limits(suite, suite.parse_options(cell.options), cell.source, f"{grid_path}: suites.{cell.suite}:")
    with owned_folder(out, f"kvtrain eval sweep {grid_path}") as warnings:
        for warning in warnings:
            logger.warning(warning)
        done = _done(read_results(out), cells, out)
        if not (out / PROVENANCE).is_file():  # the code and machine of the first session; resumes keep it
            atomic_write_text(out / PROVENANCE, json.dumps(provenance(), indent=2))
        todo = [c for c in cells if c.key not in done]
        loaded: tuple[str, Any] | None = None
        bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc="sweep cells", unit="cell",
                   disable=not progress)
        for cell in todo:
            bar.set_postfix_str(cell.describe())
            if loaded is None or loaded[0] != cell.source:
                loaded = None  # free the previous model first
                model, tokenizer, _ = load_for_eval(cell.source)
                loaded = (cell.source, (model, tokenizer))
            model, tokenizer = loaded[1]
            suite = get_suite(cell.suite)
            config = None if cell.config is None else KVCompressionConfig.from_dict(cell.config)
            start = time.perf_counter()
            try:
                result = suite.run(model, tokenizer, config, suite.parse_options(cell.options), progress=False)
            except Exception as err:
                raise RuntimeError(f"sweep cell {cell.describe()} failed: {err}") from err
            record = {**dataclasses.asdict(cell), "result": result.to_dict(),
                      "seconds": round(time.perf_counter() - start, 3)}
            append_result(out, record)
            bar.update()
            if after_cell is not None:
                after_cell(record)
        bar.close()
    return read_results(out)
