"""How well ``foldtune label-issues`` finds label errors: inject known ones, then score what it found.

Not part of the product (uses only its public pieces). Two steps around a search on the noisy copy::

    python -m benchmarks.label_noise inject SRC DST --seed 0        # DST: SRC with known label errors
    foldtune search --data DST ...; foldtune label-issues --data DST --search NAME
    python -m benchmarks.label_noise score DST/injected.csv runs/NAME/label_issues/label_issues.csv \\
        --fixed-draft fixed.csv

``inject`` copies a data root in the competition layout (images hard-linked, so the copy costs no space;
CSVs copied, so editing them never touches SRC) and, for seeded disjoint sets of persons, flips the gender
of 5%, moves the age of 5% just across the nearest band edge (30 or 60: the hardest case, one year off),
and swaps the incorrect_mask and normal pictures of 3%. ``DST/injected.csv`` lists them (id, kind, field,
old, new). ``score`` prints precision and recall per kind at the tool's default cut (``flagged``) and at
top-K (K = how many of that kind were injected), and can write the fixes a reviewer would accept (the true
hits only, restoring the original values) as a relabel overlay.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.settings import BenchError
from trainers.io import atomic_open, write_csv_atomic

TRAIN_CSV = Path("train") / "train.csv"
IMAGES = Path("train") / "images"
EDGES = (30, 60)
RATES = {"gender": 0.05, "age": 0.05, "mask_swap": 0.03}
INJECTED_COLUMNS = ("id", "kind", "field", "old", "new")
SWAP = ("incorrect_mask", "normal")


def _copy_tree(src: Path, dst: Path) -> None:
    """CSV files copied, every other file hard-linked (copied where linking is impossible)."""
    for folder, _dirs, files in os.walk(src):
        target = dst / Path(folder).relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            source = Path(folder) / name
            if name.lower().endswith(".csv"):
                shutil.copy2(source, target / name)
                continue
            try:
                os.link(source, target / name)
            except OSError:
                shutil.copy2(source, target / name)


def across_edge(age: int, edges: tuple[int, int] = EDGES) -> int:
    """The age one step across the nearest band edge: 28 -> 30, 35 -> 29, 50 -> 60, 64 -> 59."""
    low, high = edges
    if age < low:
        return low
    if age >= high:
        return high - 1
    return low - 1 if age - (low - 1) < high - age else high


def _swap_pictures(person_dir: Path) -> None:
    """Exchange the incorrect_mask and normal files (each keeps its own extension, so its format)."""
    found = {p.stem: p for p in person_dir.iterdir() if p.stem in SWAP and not p.name.startswith(".")}
    if set(found) != set(SWAP):
        raise BenchError(f"{person_dir} lacks {' or '.join(SWAP)}; inject into a complete data root")
    incorrect, normal = found["incorrect_mask"], found["normal"]
    parked = incorrect.with_name(f".swap{incorrect.suffix}")
    incorrect.rename(parked)
    normal.rename(person_dir / f"incorrect_mask{normal.suffix}")
    parked.rename(person_dir / f"normal{incorrect.suffix}")


def inject(src: Path, dst: Path, seed: int = 0, rates: dict[str, float] | None = None) -> pd.DataFrame:
    """Copy ``src`` to ``dst`` with seeded label errors; returns (and writes) ``dst/injected.csv``."""
    rates = {**RATES, **(rates or {})}
    src, dst = Path(src), Path(dst)
    if not (src / TRAIN_CSV).is_file():
        raise BenchError(f"{src / TRAIN_CSV} not found; SRC must be a data root with train/train.csv")
    if dst.exists() and any(dst.iterdir()):
        raise BenchError(f"{dst} exists and is not empty; pass a new folder for the noisy copy")
    with open(src / TRAIN_CSV, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header, rows = list(reader.fieldnames or []), list(reader)
    _copy_tree(src, dst)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(rows)).tolist()
    injected, start = [], 0
    for kind, rate in rates.items():
        count = max(1, round(rate * len(rows))) if rate > 0 else 0
        for index in order[start : start + count]:
            row = rows[index]
            if kind == "gender":
                old = row["gender"].strip().lower()
                row["gender"] = "female" if old == "male" else "male"
                injected.append((row["id"], kind, "gender", old, row["gender"]))
            elif kind == "age":
                old = int(row["age"])
                row["age"] = str(across_edge(old))
                injected.append((row["id"], kind, "age", str(old), row["age"]))
            else:
                _swap_pictures(dst / IMAGES / row["path"])
                injected.append((row["id"], kind, "mask_swap", "", "incorrect_mask<->normal"))
        start += count
    with atomic_open(dst / TRAIN_CSV, "w", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=header, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    table = pd.DataFrame(injected, columns=list(INJECTED_COLUMNS))
    write_csv_atomic(table, dst / "injected.csv")
    return table


def _read_issues(path: Path) -> pd.DataFrame:
    try:
        issues = pd.read_csv(path, dtype={"id": str}, keep_default_na=False)
    except (OSError, ValueError) as error:
        raise BenchError(f"{path} cannot be read ({error}); pass label-issues' label_issues.csv") from None
    missing = {"id", "kind", "flagged"} - set(issues.columns)
    if missing:
        raise BenchError(f"{path} lacks column(s) {sorted(missing)}; pass label-issues' label_issues.csv")
    issues["flagged"] = issues["flagged"].astype(str).str.lower().isin(("true", "1"))
    return issues


def score(injected: pd.DataFrame, issues: pd.DataFrame, baseline: pd.DataFrame | None = None) -> pd.DataFrame:
    """Precision and recall per injected kind, at the default cut and at top-K (K = injected count).

    ``baseline``: label-issues' list for a search on the clean source. Real data has label errors (and
    persons the models get wrong) of its own; a flag on one of those is not a false alarm about the noise
    but cannot be told from one either. With a baseline, ``base_flags`` counts the flagged persons that were
    already flagged on the clean data and were not injected, and ``precision_new`` leaves them out.
    """
    records = []
    for kind in injected["kind"].drop_duplicates():
        truth = set(injected.loc[injected["kind"] == kind, "id"].astype(str))
        found = issues[issues["kind"] == kind].drop_duplicates("id")
        cut = found[found["flagged"]]
        hits = int(cut["id"].isin(truth).sum())
        top = found.head(len(truth))
        top_hits = int(top["id"].isin(truth).sum())
        record = {
            "kind": kind,
            "injected": len(truth),
            "flagged": len(cut),
            "precision": hits / len(cut) if len(cut) else float("nan"),
            "recall": hits / len(truth),
            "precision_at_k": top_hits / len(truth),
            "recall_at_k": top_hits / len(truth),
        }
        if baseline is not None:
            before = baseline[(baseline["kind"] == kind) & baseline["flagged"]]
            base = set(before["id"].astype(str)) - truth
            base_flags = int(cut["id"].isin(base).sum())
            new = len(cut) - base_flags
            record |= {"base_flags": base_flags, "precision_new": hits / new if new else float("nan")}
        records.append(record)
    return pd.DataFrame(records)


def fixed_draft(injected: pd.DataFrame, issues: pd.DataFrame) -> pd.DataFrame:
    """The overlay a reviewer would write after the default cut: true hits only, original values back."""
    flagged = issues[issues["flagged"]]
    lines = []
    for _, row in injected.iterrows():
        hit = ((flagged["kind"] == row["kind"]) & (flagged["id"] == str(row["id"]))).any()
        if not hit:
            continue
        value = row["new"] if row["kind"] == "mask_swap" else row["old"]
        lines.append((row["id"], row["field"], value, f"label_noise: restores injected {row['kind']}"))
    return pd.DataFrame(lines, columns=["id", "field", "value", "note"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.label_noise", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inject", help="copy a data root with seeded label errors (DST/injected.csv)")
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("score", help="precision and recall of label-issues against injected.csv")
    p.add_argument("injected", type=Path)
    p.add_argument("issues", type=Path, help="label_issues.csv written by foldtune label-issues")
    p.add_argument("--fixed-draft", type=Path, help="write the true hits as a relabel overlay here")
    p.add_argument(
        "--baseline", type=Path, help="label_issues.csv of a search on the clean source (its own suspects)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "inject":
            table = inject(args.src, args.dst, args.seed)
            counts = table["kind"].value_counts().to_dict()
            print(f"noisy copy written to {args.dst}: {counts}; list in {args.dst / 'injected.csv'}")
            return 0
        injected = pd.read_csv(
            args.injected, dtype={"id": str, "old": str, "new": str}, keep_default_na=False
        )
        issues = _read_issues(args.issues)
        baseline = _read_issues(args.baseline) if args.baseline else None
        print(score(injected, issues, baseline).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        if args.fixed_draft:
            draft = fixed_draft(injected, issues)
            write_csv_atomic(draft, args.fixed_draft)
            print(f"fixed draft ({len(draft)} true hits) written to {args.fixed_draft}")
        return 0
    except (BenchError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
