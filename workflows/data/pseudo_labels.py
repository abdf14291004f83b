"""`data import predictions`: a `predict --ray` job's predictions as a labelled manifest (pseudo-labels), for
fine-tuning on a corpus nobody labelled: each row whose most probable class is at least `--min-prob` likely becomes
`path,label[,start,end]` with that class, at most `--per-class` rows a class (the most confident), and labels.json is
the job's whole label set, so the indices match the checkpoint's.

The predictions folder is read where `predict --ray --out` wrote it (a folder, or a bucket prefix), in either format.
Paths are written as the job wrote them: a local relative path is taken from the current folder (as `predict` took
it) and written relative to the manifest when the video lies below it, else absolute; a bucket URI as it is.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workflows.data.manifest import load_labels, relative_to, save_labels, write_manifest
from workflows.runtime import REDACTED, in_bucket, is_remote


@dataclass
class PseudoLabelReport:
    """What an import kept and why the other rows were left out."""

    rows: int = 0  # in the predictions
    unread: int = 0  # videos the job could not read
    below: int = 0  # most probable class under --min-prob
    over_cap: int = 0  # confident, but past --per-class for their class
    per_class: Counter[str] = field(default_factory=Counter)  # kept rows per class
    class_names: list[str] = field(default_factory=list)  # the label set
    manifest: str = ""
    labels: str = ""

    @property
    def kept(self) -> int:
        return sum(self.per_class.values())

    def summary(self, min_prob: float) -> list[str]:
        empty = [name for name in self.class_names if name not in self.per_class]
        named = f": {', '.join(empty[:10])}{', ...' if len(empty) > 10 else ''}" if empty else ""
        lines = [f"wrote {self.manifest}: {self.kept} of the job's {self.rows} rows, labels {self.labels} "
                 f"({len(self.class_names)} classes, {len(empty)} without a row{named})",
                 f"left out: {self.below} below --min-prob {min_prob:g}, {self.over_cap} over --per-class, "
                 f"{self.unread} the job could not read"]
        if 0 < len(self.per_class) <= 5:  # "most" and "fewest" would list the same classes
            lines.append("rows: " + ", ".join(f"{name} {n}" for name, n in self.per_class.most_common()))
        elif self.per_class:
            most = ", ".join(f"{name} {n}" for name, n in self.per_class.most_common(5))
            fewest = ", ".join(f"{name} {n}" for name, n in sorted(self.per_class.items(), key=lambda kv: kv[1])[:5])
            lines.append(f"most rows: {most}; fewest: {fewest}")
        return lines


def _read_folder(source: str) -> tuple[Path, Any]:
    """(the folder holding the job's files, the staging folder to remove after or None)."""
    if in_bucket(source):
        from workflows.batch_predict import JOB_FILE, LABELS_FILE, job_tables
        from workflows.outputs import OutputFolder
        from workflows.prediction_tables import FORMATS

        staging = OutputFolder(source, "--predictions")
        staging.fetch([JOB_FILE, LABELS_FILE, *(job_tables(staging.local, fmt, [""], 1)[0].shown for fmt in FORMATS)])
        return staging.local, staging.local
    folder = Path(source.removeprefix("file://")).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"--predictions {source} is not a folder: give the --out of a `predict --ray` job")
    return folder, None


def _label_set(folder: Path, job: dict[str, Any], labels: str | None, fmt: str) -> tuple[list[str], str]:
    """The job's class names in index order, and where they came from: --labels, the job's labels.json, or (jobs
    from before it was written) a Parquet part's metadata."""
    from workflows.batch_predict import LABELS_FILE, job_tables

    if labels is None and (folder / LABELS_FILE).is_file():
        labels = str(folder / LABELS_FILE)
    if labels is not None:
        label_map = load_labels(labels)
        names = [name for name, _ in sorted(label_map.items(), key=lambda kv: kv[1])]
        source = labels
    elif fmt == "parquet" and (stored := job_tables(folder, fmt, [""], 1)[0].stored_class_names()):
        names, source = stored, "the predictions' metadata"
    else:
        raise ValueError("the predictions do not say their label set (a job from before labels.json was written): "
                         "give --labels, the label file the job scored against")
    if job.get("num_classes") not in (None, len(names)):
        raise ValueError(f"{source} has {len(names)} classes, the job scored {job['num_classes']}: give the label "
                         f"file the job used")
    return names, source


def import_predictions(source: str, out_dir: str | Path, *, min_prob: float = 0.0, per_class: int | None = None,
                       labels: str | None = None) -> PseudoLabelReport:
    """Write `out_dir`/train.csv and labels.json from the predictions of the `predict --ray` job in `source`."""
    from workflows.batch_predict import JOB_FILE, job_tables

    if not 0.0 <= min_prob <= 1.0:
        raise ValueError(f"--min-prob must be a probability between 0 and 1, got {min_prob}")
    if per_class is not None and per_class < 1:
        raise ValueError(f"--per-class must be >= 1, got {per_class}")
    folder, staging = _read_folder(source)
    try:
        if not (folder / JOB_FILE).is_file():
            raise ValueError(f"--predictions {source} holds no {JOB_FILE}: give the --out of a `predict --ray` job")
        job = json.loads((folder / JOB_FILE).read_text())
        fmt = job.get("format", "csv")
        names, _ = _label_set(folder, job, labels, fmt)
        predictions = job_tables(folder, fmt, names, int(job.get("top") or 1))[0]
        if not predictions.exists():
            raise ValueError(f"--predictions {source} holds no predictions yet: the job has not written a row")
        found = predictions.columns(["path", "start", "end", "class_1", "prob_1", "dropped"])
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return _write(found, names, Path(out_dir), min_prob, per_class)


def _write(found: dict[str, list[Any]], names: list[str], out: Path, min_prob: float,
           per_class: int | None) -> PseudoLabelReport:
    report = PseudoLabelReport(rows=len(found["path"]), class_names=names, manifest=str(out / "train.csv"),
                               labels=str(out / "labels.json"))
    known = set(names)
    confident: list[tuple[int, float]] = []  # (row, probability)
    for i, (label, prob, dropped) in enumerate(zip(found["class_1"], found["prob_1"], found["dropped"],
                                                   strict=True)):
        if dropped:
            report.unread += 1
        elif float(prob) < min_prob:
            report.below += 1
        elif label not in known:
            raise ValueError(f"row {i} of the predictions names class {label!r}, not in the label set: give --labels, "
                             f"the label file the job scored against")
        else:
            confident.append((i, float(prob)))
    if per_class is not None:  # the most confident of each class
        by_class: dict[str, list[tuple[int, float]]] = {}
        for i, prob in confident:
            by_class.setdefault(found["class_1"][i], []).append((i, prob))
        capped = {i for rows in by_class.values() for i, _ in sorted(rows, key=lambda r: -r[1])[:per_class]}
        report.over_cap = len(confident) - len(capped)
        confident = [(i, p) for i, p in confident if i in capped]
    rows = []
    for i, _ in confident:
        path = str(found["path"][i])
        if REDACTED in path:
            raise ValueError(f"row {i} names {path}: the job wrote its URI with the credentials replaced, so it "
                             f"cannot be read from the manifest. Give the credentials in the environment "
                             f"(AWS_ACCESS_KEY_ID, ...) and the videos without them")
        window = {k: float(found[k][i]) for k in ("start", "end") if found[k][i] not in ("", None)}
        rows.append({"path": path if is_remote(path) else relative_to(path, out), "label": found["class_1"][i],
                     **window})
        report.per_class[found["class_1"][i]] += 1
    if not rows:
        raise ValueError(f"no row has a most probable class at --min-prob {min_prob:g} or above "
                         f"({report.rows} rows, {report.unread} unread): lower --min-prob")
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(rows, out / "train.csv")
    save_labels({name: i for i, name in enumerate(names)}, out / "labels.json")
    return report
