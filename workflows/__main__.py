"""One CLI for every workflow: `python -m workflows <command> [args]`.

Each command lives in its own module exposing `main(argv: list[str]) -> int`; modules are imported only when
their command runs, so `python -m workflows --help` stays fast and a broken optional dependency of one
workflow never breaks another.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("workflows.data.cli", "video dataset tools: check, sample, import, clips, transcode, upload, k710, "
                                   "kinetics"),
    "demo": ("workflows.demo", "the local demo: DiST vs a spatial-only baseline on the sample motion data"),
    "pretrain": ("workflows.pretrain", "pre-train or fine-tune DiST with Ray Train + DeepSpeed, tracked in MLflow"),
    "tune": ("workflows.tune.driver", "Ray Tune sweeps over fusion layers and widths, one MLflow parent run per sweep"),
    "evaluate": ("workflows.evaluate", "multi-view test of a checkpoint (or frozen CLIP) on any label set, on Ray"),
    "predict": ("workflows.predict", "top-k classes of video files with a checkpoint, locally, or of a whole corpus "
                                     "on Ray (--ray)"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: python -m workflows <command> [args]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `python -m workflows <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; valid commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    from workflows.runtime import interrupted_exit_code, stop_like_ctrl_c, stop_signal_note

    # SIGTERM (`ray job stop`, a scheduler) stops every command as Ctrl-C does: otherwise the handler ray.init
    # installs aborts the process with a C++ stack on the console. Commands that can say more (where a run or a
    # job continues) catch the interrupt themselves; this is the line for the others.
    stop_like_ctrl_c()
    module = importlib.import_module(COMMANDS[command][0])
    try:
        return int(module.main(rest) or 0)
    except KeyboardInterrupt:
        print(f"interrupted{stop_signal_note()}", file=sys.stderr)
        return interrupted_exit_code()


if __name__ == "__main__":
    sys.exit(main())
