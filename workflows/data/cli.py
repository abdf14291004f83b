"""`python -m workflows data <tool>`: dataset tools.

    data check     --manifest M [--labels L] [--json]     decode every video once (on Ray) and report problems
    data transcode --manifest M --out DIR                  rewrite the corpus at short side 320, short GOP (PyAV)
                   [--cut]                                 each row's start,end window as a file of its own
    data clips     --manifest M --clip-seconds 10 --out M2  cut long videos into clips (rows with start,end)
    data k710      --csv [k400:]train.csv ... --videos DIR --out DIR   assemble Kinetics-710
    data kinetics  --csv k400:train.csv --csv k400:validate.csv --videos DIR --out DIR   one release (K400)
    data sample    --out DIR                               write the synthetic motion dataset
    data upload    DIR s3://bucket/prefix                  copy a dataset folder into a bucket (no shared disk)
    data import    ssv2|list|folders|ucf101|hmdb51 ...     manifests from SSV2 JSON, `path label` lists, a folder
                                                           of class folders, or the official UCF101 / HMDB51 splits
    data import    predictions --predictions DIR --out DIR  a `predict --ray` job's confident rows as pseudo-labels

`check` exits with 0 when every video decodes, every label is in the label file and no two rows give one clip
different labels, 1 otherwise (also when a bucket
stopped answering: those videos are reported as not checked, never as dropped). Ray tools connect to `--address` (or
RAY_ADDRESS) when given, else to a Ray running on this machine, else start a local one (`--address local`: always a
new local Ray).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from workflows.config_loader import CommandParser
from workflows.data.doctor import MIN_FRAMES

ADDRESS_HELP = ("Ray cluster address (default: RAY_ADDRESS, else a Ray running on this machine, else a new local "
                "one; 'local': always a new local Ray)")


def _init_ray(address: str | None) -> None:
    from ray.data import DataContext

    from workflows.console import quiet_ray_console
    from workflows.runtime import ensure_ray

    quiet_ray_console()  # Ray Data's INFO lines (execution plans, "progress bars disabled") go to Ray's log files
    ensure_ray(address=address, quiet=True)
    DataContext.get_current().enable_progress_bars = False  # our own progress lines; keeps --json output clean


def _format_check(report: dict[str, Any]) -> str:
    lines = [f"manifest: {report['manifest']}",
             f"videos: {report['videos']}   ok: {report['ok']}   dropped: {sum(report['dropped'].values())}"]
    if report["unreachable"]:
        lines.append(f"NOT CHECKED: {report['unreachable']} videos, their storage stopped answering and the check "
                     f"stopped (not bad videos: run it again once the storage answers): {report['storage_error']}")
    for reason, count in sorted(report["dropped"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {reason}: {count}")
        for path in report["examples"].get(reason, []):
            lines.append(f"      {path}  ({report['details'].get(path, '')[:160]})")
    shorter = report["shorter_than_declared"]
    if shorter["count"]:
        lines.append(f"usable, but decode to well under the duration their header declares (damaged, or a video "
                     f"track that ends early; not dropped): {shorter['count']}")
        lines += [f"      {example}" for example in shorter["examples"]]
    long = report["long_rows"]
    if long["count"]:
        lines.append(f"rows longer than {long['seconds']:g} s: {long['count']}. DiST spreads its frames over a whole "
                     f"row, so in these they are seconds apart and the motion between them is lost: cut them into "
                     f"clips (`data clips --manifest {report['manifest']} --clip-seconds 10 --out NEW.csv`)")
        lines += [f"      {example}" for example in long["examples"]]
    shown = report["displayed_not_as_stored"]
    if shown["turned"] or shown["non_square_pixels"]:
        lines.append(f"decoded as a player shows them, not as stored: {shown['turned']} turned by their display "
                     f"rotation (phone videos), {shown['non_square_pixels']} with non-square pixels made square")
        lines += [f"      {example}" for example in shown["examples"]]
    lines += report["duplicate_warnings"]
    if report["unknown_labels"]:
        lines.append(f"labels not in the label file: {len(report['unknown_labels'])}")
        for name, rows in list(report["unknown_labels"].items())[:10]:
            meant = report.get("meant_labels", {}).get(name)
            lines.append(f"  {name!r} ({report['numbered_by']}{'s' if len(rows) > 1 else ''} "
                         f"{', '.join(map(str, rows))}{f'; did you mean {meant!r}?' if meant else ''})")
    for key, title in (("frames", "frames per video"), ("duration_s", "duration (s)"), ("fps", "fps"),
                       ("short_side", "short side (px)")):
        s = report[key]
        if s:
            lines.append(f"{title}: min {s['min']:.4g}  median {s['median']:.4g}  max {s['max']:.4g}")
    if report["resolutions"]:
        lines.append("resolutions: " + ", ".join(f"{k} ({v})" for k, v in report["resolutions"].items()))
    lines.append(f"decode: {report['videos_per_second']:.1f} videos/s overall "
                 f"({report['decode_seconds_per_video'] * 1000:.0f} ms per video per core), "
                 f"{report['wall_seconds']:.1f} s")
    return "\n".join(lines)


def _cmd_check(args: argparse.Namespace) -> int:
    from workflows.data.doctor import check_arguments, check_dataset
    from workflows.data.manifest import load_labels, load_manifest

    # Bad options, a bad label file and a bad manifest path or format all fail here, before Ray starts.
    check_arguments(args.frames, args.min_frames, args.storage_retry_s)
    labels = load_labels(args.labels) if args.labels else None
    load_manifest(args.manifest, labels, strict=False)
    _init_ray(args.address)
    if not args.json:
        from workflows.runtime import ray_description

        print(f"checking {args.manifest} on {ray_description()} ...", flush=True)
    report = check_dataset(args.manifest, labels, num_frames=args.frames, min_frames=args.min_frames,
                           progress=not args.json, storage_retry_s=args.storage_retry_s)
    if args.bad_list:
        _write_bad_list(args.bad_list, report["bad"])
    if args.json:
        print(json.dumps(report))
    else:
        print(_format_check(report))
        if args.bad_list:
            print(f"every video not ok ({len(report['bad'])}): {args.bad_list}")
    return 0 if report["ok"] == report["videos"] and not report["unknown_labels"] and not report["label_conflicts"] \
        else 1


def _write_bad_list(path: str, bad: list[dict[str, str]]) -> None:
    """`data check --bad-list`: one CSV row (path, reason, detail) per video that is not ok."""
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "reason", "detail"])
        writer.writeheader()
        writer.writerows(bad)


def _cmd_transcode(args: argparse.Namespace) -> int:
    from workflows.data.manifest import load_manifest
    from workflows.data.transcode import check_transcode_arguments, transcode_dataset

    check_transcode_arguments(args.manifest, args.out, short_side=args.short_side, gop=args.gop, crf=args.crf,
                              storage_retry_s=args.storage_retry_s)
    load_manifest(args.manifest, None, strict=False)
    _init_ray(args.address)
    result = transcode_dataset(args.manifest, args.out, short_side=args.short_side, gop=args.gop, crf=args.crf,
                               cut=args.cut, progress=not args.json, storage_retry_s=args.storage_retry_s)
    print(json.dumps(result) if args.json else _format_transcode(result))
    return 1 if result["dropped"] else 0  # rows left out of the new manifest: a failure, as `data check` says


def _format_transcode(result: dict[str, Any]) -> str:
    """`transcode_dataset`'s result for the console: the new manifest, then each reason a video was left out."""
    dropped = sum(result["dropped"].values())
    done = f"{result['ok']} of {result['videos']} rows' clips cut from {result['source_files']} videos" \
        if result.get("cut") else f"{result['ok']} of {result['videos']} videos transcoded"
    left_out = f", {dropped} left out (not in the new manifest):" if dropped else ""
    nodes = result.get("nodes", 1)
    where = f" on {nodes} nodes" if nodes > 1 else ""
    lines = [f"wrote {result['manifest']}: {done}{where}{left_out}"]
    lines += [f"  {reason}: {count}, e.g. {', '.join(result['examples'][reason][:3])}"
              for reason, count in result["dropped"].items()]
    return "\n".join(lines)


def _kinetics_csvs(specs: list[str]) -> list[tuple[str, str]]:
    """(release, path) of each `--csv [RELEASE:]PATH`, the release inferred from the path when not given."""
    from workflows.data.kinetics import release_of

    annotations = []
    for spec in specs:
        release, sep, path = spec.partition(":")
        if not sep or "/" in release:  # no explicit release (or a path with a colon): infer from the path
            release, path = release_of(spec), spec
        annotations.append((release.lower(), path))
    return annotations


def _cmd_k710(args: argparse.Namespace) -> int:
    from workflows.data.kinetics import assemble_k710, assemble_release, load_alias_file
    from workflows.data.manifest import check_output_folder

    check_output_folder(args.out)
    annotations = _kinetics_csvs(args.csv)
    if args.tool == "kinetics":
        report = assemble_release(annotations, args.videos, args.out, keep_missing=args.keep_missing)
    else:
        aliases = load_alias_file(args.aliases) if args.aliases else None
        report = assemble_k710(annotations, args.videos, args.out, aliases=aliases, keep_missing=args.keep_missing)
    from dataclasses import asdict

    print(json.dumps(asdict(report)) if args.json else report.summary())
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from workflows.data.manifest import check_output_folder
    from workflows.data.sample import write_sample_dataset

    check_output_folder(args.out)
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers {args.workers}: must be at least 1 (leave it out for the CPUs, at most 4)")
    info = write_sample_dataset(args.out, videos_per_class=args.videos_per_class, size=args.size,
                                num_frames=args.frames, seed=args.seed, fps=args.fps, num_objects=args.objects,
                                workers=args.workers,
                                progress=not args.json)
    print(json.dumps(asdict(info)) if args.json else
          f"wrote {info.train_videos} train + {info.val_videos} val videos ({len(info.classes)} classes, "
          f"{info.size}px, {info.num_frames} frames, {info.num_objects} object(s) per video) to {info.root}\n"
          f"  train: {info.train_manifest}\n"
          f"  val: {info.val_manifest}\n  labels: {info.labels}\n"
          f"  train with flip: swap_labels, flip_pairs: {info.flip_pairs}")
    return 0


def _cmd_upload(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from workflows.data.upload import upload_dataset

    try:
        report = upload_dataset(args.source, args.destination, progress=not args.json, retry_s=args.storage_retry_s)
    except OSError as exc:  # the bucket cannot be reached or written (ValueError: bad input, handled by main)
        print(f"error: data upload to {args.destination} failed: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(report)) if args.json else report.summary(), flush=True)
    return 0


def _cmd_clips(args: argparse.Namespace) -> int:
    from workflows.data.clips import cut_manifest

    result = cut_manifest(args.manifest, args.out, args.clip_seconds, progress=True)
    print("\n".join(result.summary() + ([f"note: {result.path_note}"] if result.path_note else [])), flush=True)
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from pathlib import Path

    from workflows.data.importers import import_hmdb51, import_list, import_ssv2, import_ucf101
    from workflows.data.manifest import check_output_folder

    if args.format == "folders":
        from workflows.data.folder_import import import_folders
        from workflows.runtime import is_remote

        if not is_remote(args.out):
            check_output_folder(args.out)
        result = import_folders(args.videos, args.out, val_videos=args.val_videos, val_fraction=args.val_fraction,
                                seed=args.seed, labels=args.labels, clip_seconds=args.clip_seconds, progress=True)
        print("\n".join(result.summary()))
        return 0
    if args.format == "predictions":
        from workflows.data.pseudo_labels import import_predictions

        check_output_folder(args.out)
        report = import_predictions(args.predictions, args.out, min_prob=args.min_prob, per_class=args.per_class,
                                    labels=args.labels)
        print("\n".join(report.summary(args.min_prob)))
        return 0
    if args.format in ("ucf101", "hmdb51"):  # --out is a folder: train.csv, val.csv and labels.json go into it
        importer = import_ucf101 if args.format == "ucf101" else import_hmdb51
        check_output_folder(args.out)
        for report in importer(args.videos, args.splits, args.split, args.out, check_files=args.check):
            print(report.summary())
        return 0
    if Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a folder; give the manifest file to write (labels.json goes beside it)")
    check_output_folder(Path(args.out).parent, f"--out {args.out}: its folder")
    if args.format == "ssv2":
        report = import_ssv2(args.annotations, args.labels, args.videos, args.out,
                             check_files=args.check)
    else:
        report = import_list(args.list, args.out, root=args.root, labels=args.labels, check_files=args.check)
    print(report.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `data` command's argument parser."""
    p = CommandParser(prog="python -m workflows data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="tool", required=True)

    c = sub.add_parser("check", help="decode every video once and report problems")
    c.add_argument("--manifest", required=True,
                   help="CSV/TSV or Parquet manifest (path,label[,start,end]); local or in a bucket")
    c.add_argument("--labels", help="label file JSON {class: index}; labels not in it are reported")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.add_argument("--frames", type=int, default=16,
                   help="frames decoded per video, spread over its length (default 16)")
    c.add_argument("--min-frames", type=int, default=MIN_FRAMES,
                   help=f"videos with fewer frames count as too_short (default {MIN_FRAMES}, data.min_frames' default)")
    c.add_argument("--bad-list", metavar="CSV", help="write every video that is not ok (path, reason, detail) here")
    c.add_argument("--storage-retry-s", type=float,
                   help="how long a video in a bucket that does not answer is retried before the check stops "
                        "(default 120 s)")
    c.add_argument("--address", help=ADDRESS_HELP)
    c.set_defaults(run=_cmd_check)

    t = sub.add_parser("transcode", help="rewrite videos at a small short side with a short keyframe interval")
    t.add_argument("--manifest", required=True, help="the manifest of the videos to rewrite")
    t.add_argument("--out", required=True,
                   help="new folder for the videos and the new manifest: a bucket prefix (s3://bucket/prefix) to "
                        "transcode on every node of the cluster, or a local folder (transcoded on every node that "
                        "sees the same files there, a shared disk; else on this node alone)")
    t.add_argument("--short-side", type=int, default=320, help="pixels of the shorter side after the resize "
                   "(default 320; never upscaled)")
    t.add_argument("--gop", type=int, default=16, help="keyframe interval in frames (default 16)")
    t.add_argument("--crf", type=int, default=23, help="x264 quality, lower is better and larger (default 23)")
    t.add_argument("--cut", action="store_true",
                   help="write each row's start,end window as a file of its own (rows of the new manifest without "
                        "windows): a long recording cut into clips is then read clip by clip, not whole per clip")
    t.add_argument("--storage-retry-s", type=float,
                   help="how long a bucket that does not answer (a read, an upload) is retried before the command "
                        "stops (default 120 s)")
    t.add_argument("--json", action="store_true", help="print one JSON object")
    t.add_argument("--address", help=ADDRESS_HELP)
    t.set_defaults(run=_cmd_transcode)

    k = sub.add_parser("k710", help="assemble Kinetics-710 from the K400/600/700 CSVs")
    k.add_argument("--csv", action="append", required=True,
                   help="[RELEASE:]PATH of an official CSV (release k400/k600/k700 inferred from the path if omitted)")
    k.add_argument("--videos", help="folder of downloaded clips (<youtube_id>[_start_end].mp4, any depth)")
    k.add_argument("--out", required=True, help="folder for train.csv, val.csv and labels.json (710 classes)")
    k.add_argument("--aliases", help="JSON {class name variant: canonical name} applied after normalisation")
    k.add_argument("--keep-missing", action="store_true", help="keep listed videos that are not on disk")
    k.add_argument("--json", action="store_true", help="print one JSON object")
    k.set_defaults(run=_cmd_k710)

    kk = sub.add_parser("kinetics", help="one Kinetics release (K400, K600 or K700) from its official CSVs, with "
                                         "its own class names")
    kk.add_argument("--csv", action="append", required=True,
                    help="[RELEASE:]PATH of the release's official train and validate CSVs (the test CSV too: its "
                         "videos are kept out of training)")
    kk.add_argument("--videos", help="folder of downloaded clips (<youtube_id>[_start_end].mp4, any depth)")
    kk.add_argument("--out", required=True, help="folder for train.csv, val.csv and labels.json")
    kk.add_argument("--keep-missing", action="store_true", help="keep listed videos that are not on disk")
    kk.add_argument("--json", action="store_true", help="print one JSON object")
    kk.set_defaults(run=_cmd_k710)

    s = sub.add_parser("sample", help="write the synthetic motion dataset (H.264 mp4 + manifests)")
    s.add_argument("--out", required=True, help="folder for the videos, train.csv, val.csv and labels.json")
    s.add_argument("--videos-per-class", type=int, default=40, help="default 40 (make demo: 150)")
    s.add_argument("--size", type=int, default=64, help="square frame size in pixels (default 64)")
    s.add_argument("--frames", type=int, default=32, help="frames per video (default 32)")
    s.add_argument("--fps", type=int, default=16, help="default 16")
    s.add_argument("--seed", type=int, default=0, help="the same seed writes the same videos (default 0)")
    s.add_argument("--objects", type=int, default=1, help="objects per video, all moving as the class says "
                   "(default 1; make demo: 3)")
    s.add_argument("--workers", type=int, default=None,
                   help="processes writing videos (default: the CPUs, at most 4)")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(run=_cmd_sample)

    u = sub.add_parser("upload", help="copy a dataset folder (videos, manifests, labels) into a bucket")
    u.add_argument("source", help="the local dataset folder; its manifests must name videos relative to themselves")
    u.add_argument("destination", help="bucket URI, e.g. s3://my-bucket/datasets/sample (credentials and endpoint "
                                       "from the environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                                       "AWS_ENDPOINT_URL, ...)")
    u.add_argument("--storage-retry-s", type=float,
                   help="how long a bucket that does not answer is retried per file before the upload stops "
                        "(default 120 s; run the same command again to copy what is missing)")
    u.add_argument("--json", action="store_true", help="print one JSON object")
    u.set_defaults(run=_cmd_upload)

    cl = sub.add_parser("clips", help="cut a manifest's long videos into clips of a few seconds (rows with "
                                      "start,end)")
    cl.add_argument("--manifest", required=True, help="the manifest of the videos to cut (local or in a bucket)")
    cl.add_argument("--clip-seconds", type=float, required=True, help="seconds per clip, e.g. 10 (Kinetics' length)")
    cl.add_argument("--out", required=True, help="the new manifest (CSV, or Parquet by its suffix)")
    cl.set_defaults(run=_cmd_clips)

    i = sub.add_parser("import", help="write manifests from SSV2 JSON, a `path label` list, a folder of class "
                                      "folders, the official UCF101 / HMDB51 split files, or a `predict --ray` job")
    isub = i.add_subparsers(dest="format", required=True)
    i1 = isub.add_parser("ssv2", help="Something-Something-V2's JSON annotations")
    i1.add_argument("--annotations", required=True, help="something-something-v2-{train,validation}.json")
    i1.add_argument("--labels", required=True, help="something-something-v2-labels.json")
    i1.add_argument("--videos", required=True, help="folder of <id>.webm / <id>.mp4")
    i1.add_argument("--out", required=True, help="manifest to write (labels.json goes beside it)")
    i1.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                    help="drop (and count) listed files that do not exist (default: --check)")
    i2 = isub.add_parser("list", help="a text file of `path label` lines")
    i2.add_argument("--list", required=True, help="text file of `relative/path.mp4 label` lines")
    i2.add_argument("--out", required=True, help="manifest to write (a file, not a folder)")
    i2.add_argument("--root", help="folder the list's paths are relative to (default: the list's folder)")
    i2.add_argument("--labels", help="label file; needed to name integer labels")
    i2.add_argument("--check", action=argparse.BooleanOptionalAction, default=False,
                    help="drop (and count) listed files that do not exist (default: --no-check)")
    i3 = isub.add_parser("folders", help="your own videos as one folder per class (<class>/<video>)")
    i3.add_argument("--videos", required=True, help="the folder of one folder per class, local or in a bucket "
                                                    "(s3://bucket/prefix); a class folder's name, as words, is the "
                                                    "class name")
    i3.add_argument("--out", required=True, help="folder for train.csv, val.csv and labels.json, local or (for videos "
                                                 "in a bucket) a bucket prefix; the manifests name the videos below "
                                                 "it relative to themselves")
    i3.add_argument("--val-videos", help="a folder of validation videos in the same layout (default: a seeded "
                                         "--val-fraction of each class)")
    i3.add_argument("--val-fraction", type=float, default=0.1,
                    help="share of each class's videos put in val.csv when there is no --val-videos (default 0.1)")
    i3.add_argument("--seed", type=int, default=0, help="which videos go to val.csv (default 0)")
    i3.add_argument("--labels", help="an existing label file the folders' classes must be in (its indices are kept; "
                                     "default: one made from the folder names)")
    i3.add_argument("--clip-seconds", type=float, help="cut each video into clips of this many seconds (rows with "
                                                       "start,end), for long recordings; default: whole videos")
    for name, videos, splits in (
            ("ucf101", "UCF101", "ucfTrainTestlist (classInd.txt, trainlist0N.txt, testlist0N.txt)"),
            ("hmdb51", "hmdb51_org", "testTrainMulti_7030_splits (<class>_test_split<N>.txt)")):
        b = isub.add_parser(name, help=f"one official {name.upper()} split (train.csv, val.csv: its test list)")
        b.add_argument("--videos", required=True, help=f"the folder of one folder per class ({videos})")
        b.add_argument("--splits", required=True, help=f"the official split folder, {splits}")
        b.add_argument("--split", type=int, required=True, help="official split 1, 2 or 3")
        b.add_argument("--out", required=True, help="folder for train.csv, val.csv (the official test list) and "
                                                    "labels.json")
        b.add_argument("--check", action=argparse.BooleanOptionalAction, default=False,
                       help="drop (and count) listed files that do not exist (a path that differs only in case is "
                            "found; default: --no-check)")
    i4 = isub.add_parser("predictions", help="a `predict --ray` job's confident predictions as a labelled manifest "
                                             "(pseudo-labels)")
    i4.add_argument("--predictions", required=True, help="the job's --out: a folder or a bucket prefix, CSV or "
                                                         "Parquet")
    i4.add_argument("--out", required=True, help="folder for train.csv (path,label[,start,end]) and labels.json (the "
                                                 "job's whole label set)")
    i4.add_argument("--min-prob", type=float, default=0.0,
                    help="keep a row when its most probable class is at least this likely (default 0: every read row)")
    i4.add_argument("--per-class", type=int, help="keep at most this many rows a class, the most confident")
    i4.add_argument("--labels", help="the label file the job scored against (default: the labels.json the job wrote)")
    i.set_defaults(run=_cmd_import)
    return p


def main(argv: list[str]) -> int:
    """Entry point of `python -m workflows data ...`."""
    from workflows.data.video import StorageUnreachable

    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (ValueError, FileNotFoundError, StorageUnreachable) as exc:  # the last: a bucket that stopped answering
        print(f"error: {exc}", file=sys.stderr)
        return 2
