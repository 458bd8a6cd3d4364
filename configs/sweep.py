"""The typed sweep file (``configs/sweeps/*.yaml``) and its expansion into cells.

A sweep is a base experiment config, overrides shared by every cell, a list of named variants
and/or a grid of values (their product), and seeds. Each cell is one training run: the base
config with the sweep's, the variant's and the grid point's overrides and ``seed=<s>``, in its
own output folder. Every cell's config is loaded and validated here, so a typo in any cell fails
before the first one starts.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from configs.schema import ExperimentConfig, format_errors, load_config


class Variant(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.=-]+$")
    set: dict[str, Any] = {}
    seeds: Optional[list[int]] = Field(None, min_length=1,
                                       description="this variant's seeds instead of the sweep's")


class ReportSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    baseline: Optional[str] = Field(None, description="the group that differences are taken to")
    group_by: Literal["label"] = "label"


class SweepSpec(BaseModel):
    """What a sweep file holds (see configs/sweeps/paper_table1_tiny.yaml)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    base: str
    set: dict[str, Any] = Field({}, description="overrides applied to every cell")
    variants: list[Variant] = []
    grid: dict[str, list[Any]] = {}
    seeds: list[int] = Field([0], min_length=1)
    concurrency: int = Field(1, ge=1, description="cells in flight at once")
    executor: Literal["inline", "deployment", "ray"] = "inline"
    deployment: str = Field("train/ibtpo-train", description="with executor: deployment")
    ray_address: Optional[str] = Field(
        None, description="with executor: ray, the cluster the cells run on (host:port of its "
        "head, ray://host:10001, or auto); null starts a local Ray for the sweep")
    output_dir: str = "runs/sweeps/${name}"
    report: ReportSpec = ReportSpec()

    @model_validator(mode="after")
    def _checks(self):
        empty = [k for k, v in self.grid.items() if not v]
        if empty:
            raise ValueError(f"grid key(s) {empty} have no values: give each a list such as "
                             f"[0.5, 1.0], or remove it")
        names = [v.name for v in self.variants]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"variant names must be unique; repeated: {dup}")
        for seeds in [self.seeds] + [v.seeds for v in self.variants if v.seeds]:
            if len(set(seeds)) != len(seeds):
                raise ValueError(f"seeds repeat: {seeds}")
        if not self.variants and not self.grid:
            raise ValueError("the sweep has no cells: give variants (a list of {name, set}) or a "
                             "grid (key: [values]), e.g. grid: {algo.method: [ibtpo, grpo]}")
        if self.executor == "inline" and self.concurrency > 1:
            raise ValueError(
                f"concurrency={self.concurrency} needs executor: deployment (cells run "
                f"as deployment runs on a work pool) or executor: ray (cells run as Ray tasks); "
                f"inline cells run one at a time"
            )
        if self.ray_address is not None and self.executor != "ray":
            raise ValueError(f"ray_address is read with executor: ray only (this sweep's "
                             f"executor is {self.executor}): set executor: ray or remove it")
        return self


@dataclass(frozen=True)
class Cell:
    """One training run of a sweep: ``label`` names its variant/grid point, ``name`` the run."""

    label: str
    seed: int
    name: str
    overrides: tuple[str, ...]
    index: int = 0  # place in the sweep's expansion

    def tags(self, sweep_tags: dict) -> dict:
        """The MLflow tags of this cell's run: the sweep's, and which cell it is."""
        return {**sweep_tags, "ibtpo.sweep_cell": self.label, "ibtpo.seed": str(self.seed),
                "ibtpo.cell_index": str(self.index)}


def _fmt(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")


def _slug(key: str, value: Any) -> str:
    short = key.rsplit(".", 1)[-1]
    return re.sub(r"[^A-Za-z0-9_.=-]", "_", f"{short}={_fmt(value)}")


def expand(spec: SweepSpec) -> list[Cell]:
    """Variants x grid points x seeds, in that order (a variant's cells are adjacent)."""
    variants = spec.variants or [Variant(name="base")]
    keys = list(spec.grid)
    points = list(itertools.product(*spec.grid.values())) if keys else [()]
    cells = []
    out = spec.output_dir.replace("${name}", spec.name)
    for var in variants:
        for point in points:
            parts = ([var.name] if spec.variants else []) + [
                _slug(k, v) for k, v in zip(keys, point)
            ]
            label = ",".join(parts)
            sets = {**spec.set, **var.set, **dict(zip(keys, point))}
            for seed in var.seeds or spec.seeds:
                name = f"{spec.name}.{label}.s{seed}"
                ov = [f"{k}={_fmt(v)}" for k, v in sets.items()]
                ov += [f"seed={seed}", f"name={name}", f"output_dir={out}/{label}/s{seed}"]
                cells.append(Cell(label, seed, name, tuple(ov), len(cells)))
    return cells


def _sweep_errors(err: ValidationError, source: str) -> str:
    def valid_keys(section: tuple) -> list[str]:
        spec = ReportSpec if section[:1] == ("report",) else SweepSpec
        return list(spec.model_fields)

    return format_errors(err, source, "sweep file", valid_keys)


def load_sweep(path: str | Path) -> SweepSpec:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {path} does not exist: pass a YAML file such as "
                                f"configs/sweeps/paper_table1_tiny.yaml")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"sweep file {path} must be a YAML mapping (name, base, grid, seeds)")
    raw.setdefault("name", path.stem)
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as err:
        raise ValueError(_sweep_errors(err, str(path))) from None
    if not Path(spec.base).is_file():
        raise FileNotFoundError(f"sweep {path}: base config {spec.base} does not exist (paths "
                                f"are relative to the repository root)")
    return spec


def check_cells(spec: SweepSpec, cells: list[Cell]) -> dict[str, ExperimentConfig]:
    """Load every cell's config; one error naming each cell that fails and why."""
    configs, errors = {}, []
    for cell in cells:
        try:
            configs[cell.name] = load_config(spec.base, list(cell.overrides))
        except ValueError as err:
            errors.append(f"cell {cell.label} (seed {cell.seed}): {err}")
    if errors:
        raise ValueError(f"sweep {spec.name}: {len(errors)} cell(s) have invalid configs:\n"
                         + "\n".join(errors))
    return configs
