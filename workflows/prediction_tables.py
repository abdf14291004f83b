"""The tables `predict --ray` writes into --out and reads back (workflows.batch_predict): `predictions`, a row per
video (or per clip of a long file), and `file_predictions`, a row per long file. Two formats:

- **CSV** (`--format csv`, the default): `predictions.csv`, appended row by row and flushed every FLUSH_S seconds;
  the top classes are `class_k`, `prob_k` cells, most probable first. Into a bucket, the file is uploaded whole
  every PUSH_S seconds.
- **Parquet** (`--format parquet`): `predictions/part-NNNNN.parquet`, each part written whole (a hidden `.partial`
  file, renamed) once it holds PART_ROWS rows or its first row is PART_S seconds old. The top classes are two list
  columns, `classes` and `probs`, most probable first. When every class is listed (`--top all`), the rows are the
  whole distribution instead: `scores`, one float32 vector per row in the label set's order (the names in each
  part's schema metadata, `dist.class_names`), beside `class_1` and `prob_1`; a million rows at 710 classes take
  2.6 GiB where CSV takes 11 (benchmarks/prediction_tables.py). Into a bucket, each part is uploaded once, when it
  is written.

Either way a row that could not be read has no classes and says why in `dropped`. Read back, a table gives only
complete rows: a CSV's last line cut by a kill is dropped, a part not yet renamed is not read. Reading streams (a CSV
line by line, a Parquet part's few columns at a time), so continuing a job of millions of rows does not hold its
table in memory.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

FORMATS = ("csv", "parquet")
FLUSH_S = 2.0  # CSV: rows reach the disk this often
PUSH_S = 300.0  # CSV into a bucket: the files so far are uploaded this often (each whole), and at the end
PART_ROWS = 10_000  # Parquet: a part holds at most this many rows (10k x 710 float32 scores: ~28 MB in memory)
PART_S = 60.0  # Parquet: ... and is written once its first row is this old (a kill loses at most this much work)
CLASS_NAMES_KEY = b"dist.class_names"

PREDICTION_LEAD = [("video_index", pa.int64()), ("path", pa.string()), ("start", pa.float64()), ("end", pa.float64())]
FILE_LEAD = [("path", pa.string()), ("clips", pa.int64()), ("read_clips", pa.int64())]


def csv_cell(value: Any) -> Any:
    """A CSV cell: a float as its shortest text (empty when not set, NaN); anything else as it is."""
    if isinstance(value, float):
        return "" if value != value else format(value, ".10g")
    return value


def open_table(fmt: str, out: Path, name: str, lead: list[tuple[str, Any]], class_names: list[str],
               top: int) -> Table:
    """Table `name` of the job in `out` in format `fmt` (FORMATS): `lead` the row's own columns, then the `top`
    most probable of `class_names` (all of them: the whole distribution), then `dropped`."""
    return (CsvTable if fmt == "csv" else ParquetTable)(out, name, lead, class_names, top)


class Table:
    """One output table: appended to by `write`, made durable by `flush_now_and_then` and `close` (which return the
    files, relative to `out`, to upload now), read back by `columns` and cut down by `keep`."""

    def __init__(self, out: Path, name: str, lead: list[tuple[str, Any]], class_names: list[str], top: int) -> None:
        self.out, self.name, self.lead, self.class_names = out, name, lead, class_names
        self.top = min(top, len(class_names))

    @property
    def shown(self) -> str:
        """The table's name in --out, as the summary names it."""
        raise NotImplementedError

    def exists(self) -> bool:
        raise NotImplementedError

    def columns(self, names: list[str]) -> dict[str, list[Any]]:
        """The columns `names` (lead columns, `class_1`, `prob_1`, `dropped`) of the complete rows, in the order
        written; `dropped` is '' for a row that was read, `class_1` and `prob_1` '' for one that was not (CSV's
        values are its text)."""
        raise NotImplementedError

    def keep(self, keep_row: Callable[[dict[str, Any]], bool]) -> list[str]:
        """Keep only the complete rows for which `keep_row` (called once per row, in the order written, with the
        lead columns and `dropped`) is true, each file replaced whole or not at all; returns the files rewritten."""
        raise NotImplementedError

    def write(self, lead: list[Any], probs: np.ndarray | None, why: str = "") -> None:
        """One row: its lead values, its class probabilities (None: it could not be read, `why`)."""
        raise NotImplementedError

    def flush_now_and_then(self, now: float) -> list[str]:
        """Called after each batch of rows (`now`: time.monotonic()): what is due reaches the disk; returns the
        files due for an upload."""
        raise NotImplementedError

    def close(self) -> list[str]:
        """Every row on disk, the table closed; returns the files written since the last upload was due."""
        raise NotImplementedError

    def _ranked(self, probs: np.ndarray) -> np.ndarray:
        """The `top` most probable classes of each row of `probs` (..., classes), most probable first (ties: the
        label set's order)."""
        return np.argsort(-probs, axis=-1, kind="stable")[..., : self.top]


class CsvTable(Table):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.path = self.out / f"{self.name}.csv"
        self.header = [name for name, _ in self.lead] + [c for k in range(1, self.top + 1)
                                                          for c in (f"class_{k}", f"prob_{k}")] + ["dropped"]
        self.handle: Any = None
        self.last_flush = self.last_push = time.monotonic()

    @property
    def shown(self) -> str:
        return self.path.name

    def exists(self) -> bool:
        return self.path.exists()

    def _rows(self) -> Iterator[dict[str, str]]:
        """The complete rows, streamed: every line but a last one cut by a kill (the only line that can lack its
        newline)."""
        if not self.path.exists():
            return
        with self.path.open(newline="") as f:
            yield from csv.DictReader(line for line in f if line.endswith("\n"))

    def columns(self, names: list[str]) -> dict[str, list[Any]]:
        found: dict[str, list[Any]] = {name: [] for name in names}
        for row in self._rows():
            for name in names:
                found[name].append(row.get(name, ""))
        return found

    def keep(self, keep_row: Callable[[dict[str, Any]], bool]) -> list[str]:
        if not self.path.exists():
            return []
        partial = self.path.with_suffix(".partial")
        with partial.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.header)
            writer.writeheader()
            writer.writerows(row for row in self._rows() if keep_row(row))
        partial.replace(self.path)
        return [self.path.name]

    def write(self, lead: list[Any], probs: np.ndarray | None, why: str = "") -> None:
        if self.handle is None:
            new = not self.path.exists() or self.path.stat().st_size == 0
            self.handle = self.path.open("a", newline="")
            self.writer = csv.writer(self.handle)
            if new:
                self.writer.writerow(self.header)
        ranked = [""] * (2 * self.top) if probs is None else \
            [cell for k in self._ranked(probs) for cell in (self.class_names[k], round(float(probs[k]), 6))]
        self.writer.writerow([*(csv_cell(v) for v in lead), *ranked, why])

    def flush_now_and_then(self, now: float) -> list[str]:
        if self.handle is None or now - self.last_flush < FLUSH_S:
            return []
        self.last_flush = now
        self.handle.flush()
        if now - self.last_push < PUSH_S:
            return []
        self.last_push = now
        return [self.path.name]

    def close(self) -> list[str]:
        if self.handle is None:
            return []
        self.handle.close()
        self.handle = None
        return [self.path.name]


class ParquetTable(Table):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.folder = self.out / self.name
        self.every_class = self.top == len(self.class_names)
        self.pending: list[tuple[list[Any], np.ndarray | None, str]] = []
        self.first_pending = 0.0

    @property
    def shown(self) -> str:
        return f"{self.name}/"

    def exists(self) -> bool:
        return any(self.parts())

    def parts(self) -> list[Path]:
        """The parts written whole, in the order written."""
        return sorted(self.folder.glob("part-*.parquet")) if self.folder.is_dir() else []

    def stored_class_names(self) -> list[str] | None:
        """The label set the first part records in its schema metadata (None: no part yet)."""
        import pyarrow.parquet as pq

        parts = self.parts()
        return json.loads(pq.read_schema(parts[0]).metadata[CLASS_NAMES_KEY]) if parts else None

    def _relative(self, part: Path) -> str:
        return f"{self.name}/{part.name}"

    def columns(self, names: list[str]) -> dict[str, list[Any]]:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        ranked = {"class_1": "classes", "prob_1": "probs"}  # top-k rows: the first of each list
        stored = [ranked[name] if name in ranked and not self.every_class else name for name in names]
        found: dict[str, list[Any]] = {name: [] for name in names}
        for part in self.parts():
            table = pq.read_table(part, columns=list(dict.fromkeys(stored)))
            for name, column in zip(names, stored, strict=True):
                values = table[column]
                if column != name:
                    values = pc.list_element(values, 0)  # the most probable; null for an unread row
                found[name] += [("" if v is None else v) for v in values.to_pylist()] \
                    if name in ("class_1", "prob_1", "dropped") else values.to_pylist()
        return found

    def keep(self, keep_row: Callable[[dict[str, Any]], bool]) -> list[str]:
        import pyarrow.parquet as pq

        names = [name for name, _ in self.lead] + ["dropped"]
        rewritten = []
        for part in self.parts():
            table = pq.read_table(part, columns=names)
            rows = zip(*([v or "" for v in table[n].to_pylist()] if n == "dropped" else table[n].to_pylist()
                         for n in names), strict=True)
            mask = [keep_row(dict(zip(names, values, strict=True))) for values in rows]
            if not all(mask):  # the whole part read only now: the scores are most of it
                self._write_whole(pq.read_table(part).filter(pa.array(mask, pa.bool_())), part)
                rewritten.append(self._relative(part))
        return rewritten

    def write(self, lead: list[Any], probs: np.ndarray | None, why: str = "") -> None:
        if not self.pending:
            self.first_pending = time.monotonic()
        self.pending.append((lead, probs, why))

    def flush_now_and_then(self, now: float) -> list[str]:
        written = []
        while len(self.pending) >= PART_ROWS:  # full parts
            written += self._write_part(PART_ROWS)
        if self.pending and now - self.first_pending >= PART_S:
            written += self._write_part(len(self.pending))
        return written

    def close(self) -> list[str]:
        written = []
        while self.pending:
            written += self._write_part(PART_ROWS)
        return written

    def _write_part(self, rows: int) -> list[str]:
        """The first `rows` pending rows as the next part; the rest stay pending (their age counted anew)."""
        parts = self.parts()
        number = int(parts[-1].stem.removeprefix("part-")) + 1 if parts else 0
        part = self.folder / f"part-{number:05d}.parquet"
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write_whole(self._as_arrow(self.pending[:rows]), part)
        self.pending = self.pending[rows:]
        self.first_pending = time.monotonic()
        return [self._relative(part)]

    def _write_whole(self, table: pa.Table, part: Path) -> None:
        import pyarrow.parquet as pq

        # Hidden until renamed: readers of the folder (pandas, pyarrow and Ray Data datasets skip names starting
        # with "."), never a half-written part, even one a kill left behind.
        partial = part.with_name(f".{part.name}.partial")
        pq.write_table(table, partial, compression="zstd")
        partial.replace(part)

    def _as_arrow(self, rows: list[tuple[list[Any], np.ndarray | None, str]]) -> pa.Table:
        """The rows as one Arrow table with this table's schema."""
        columns: dict[str, pa.Array] = {}
        for i, (name, kind) in enumerate(self.lead):
            values = [row[0][i] for row in rows]
            if pa.types.is_floating(kind):
                values = [None if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in values]
            columns[name] = pa.array(values, kind)
        read = np.array([probs is not None for _, probs, _ in rows])
        probs = np.stack([p if p is not None else np.zeros(len(self.class_names)) for _, p, _ in rows]).astype(
            np.float32)
        names = pa.array(self.class_names, pa.string())
        ranked = self._ranked(probs[read])  # (read rows, top)

        def lists(values: pa.Array, per_row: int) -> pa.Array:
            """`values` (per_row for each read row, flat) as a list per row, null for an unread row (a
            variable-size list: Parquet cannot hold a null fixed-size one)."""
            offsets = np.concatenate([[0], np.cumsum(np.where(read, per_row, 0))]).astype(np.int32)
            return pa.ListArray.from_arrays(pa.array(offsets), values, mask=pa.array(~read))

        def class_names(indices: np.ndarray, mask: np.ndarray | None = None) -> pa.Array:
            return pa.DictionaryArray.from_arrays(pa.array(indices.reshape(-1).astype(np.int32), mask=mask),
                                                  names).cast(pa.string())

        if self.every_class:
            best = np.zeros(len(rows), np.int64)
            best[read] = ranked[:, 0]
            columns["class_1"] = class_names(best, mask=~read)
            columns["prob_1"] = pa.array(probs[np.arange(len(rows)), best], pa.float32(), mask=~read)
            columns["scores"] = lists(pa.array(probs[read].reshape(-1)), len(self.class_names))
        else:
            columns["classes"] = lists(class_names(ranked), self.top)
            columns["probs"] = lists(pa.array(np.take_along_axis(probs[read], ranked, axis=1).reshape(-1)), self.top)
        columns["dropped"] = pa.array([why or None for _, _, why in rows], pa.string())
        table = pa.table(columns)
        return table.replace_schema_metadata({CLASS_NAMES_KEY: json.dumps(self.class_names).encode()})
