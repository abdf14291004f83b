"""The strict config machinery every workflow uses: unknown keys, types, choices, overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import pytest

from workflows.config_loader import (
    ConfigError,
    add_override_option,
    drop_removed_keys,
    dump_yaml,
    from_dict,
    load_config,
)


@dataclass
class Optim:
    lr: float = 1e-3
    kind: Literal["adamw", "sgd"] = "adamw"
    removed_keys: ClassVar[dict[str, str]] = {"momentum": "use optim.kind=sgd"}  # a renamed setting


@dataclass
class Run:
    name: str = "run"
    steps: int = 10
    layers: tuple[int, ...] = (0, 1)
    optim: Optim = field(default_factory=Optim)
    note: str | None = None

    def __post_init__(self):
        if self.steps <= 0:
            raise ValueError("steps must be positive")


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: exp\noptim:\n  lr: 0.5\n")
    cfg = load_config(Run, path, ["steps=7", "optim.kind=sgd", "layers=[3, 4]", "optim.lr=2e-4"])
    assert (cfg.name, cfg.steps, cfg.layers, cfg.optim.kind, cfg.optim.lr) == ("exp", 7, (3, 4), "sgd", 2e-4)
    assert "kind: sgd" in dump_yaml(cfg)


def test_set_takes_several_pairs_or_repeats():
    import argparse

    parser = argparse.ArgumentParser()
    add_override_option(parser, "override a key")
    args = parser.parse_args(["--set", "steps=7", "optim.kind=sgd", "--set", "steps=8"])
    assert args.overrides == ["steps=7", "optim.kind=sgd", "steps=8"]
    assert load_config(Run, None, args.overrides).steps == 8  # applied in order: the last one wins
    assert parser.parse_args([]).overrides == []


@pytest.mark.parametrize(
    "data, overrides, message",
    [
        ({"stepz": 3}, [], "unknown key.*stepz.*valid keys here: name, steps"),
        ({}, ["optim.lrr=1"], r"unknown key optim.lrr in --set .optim.lrr=1. \(did you mean optim.lr\?\); valid keys "
                              r"here: optim.lr, optim.kind"),
        ({"stepz": 3}, [], r"unknown key\(s\) stepz \(did you mean steps\?\)"),
        ({"optim": {"kind": "adam"}}, [], "optim.kind: 'adam' is not valid; choose one of 'adamw', 'sgd'"),
        ({"steps": "ten"}, [], "steps: expected an integer"),
        ({"steps": -1}, [], "steps must be positive"),
        ({}, ["steps"], "must look like key.path=value"),
    ],
)
def test_bad_config_is_named(tmp_path, data, overrides, message):
    path = tmp_path / "bad.yaml"
    import yaml

    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=message):
        load_config(Run, path, overrides)


def test_missing_file_and_optional_values(tmp_path):
    with pytest.raises(ConfigError, match="does not exist$"):
        load_config(Run, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"config file smoke.yaml does not exist; the shipped recipe of that name is "
                                          r"/.*/workflows/configs/smoke.yaml"):
        load_config(Run, "smoke.yaml")  # (the tests run from the repository's root)
    assert from_dict(Run, {"note": None}).note is None
    assert from_dict(Run, {"note": "x"}).note == "x"


def test_removed_key_says_what_to_use_instead(tmp_path):
    """A key a section dropped fails, from a file and from --set, with the section's hint next to the usual list."""
    path = tmp_path / "old.yaml"
    path.write_text("optim:\n  momentum: 0.9\n")
    for file, overrides in ((path, []), (None, ["optim.momentum=0.9"])):
        with pytest.raises(ConfigError, match=r"optim\.momentum was removed: use optim\.kind=sgd.*valid keys here"):
            load_config(Run, file, overrides)
    with pytest.raises(ConfigError) as plain:  # a key that never existed: no hint
        load_config(Run, None, ["optim.mom=1"])
    assert "removed" not in str(plain.value)


def test_drop_removed_keys_for_files_the_project_wrote_itself():
    data, dropped = drop_removed_keys(Run, {"steps": 3, "optim": {"lr": 0.1, "momentum": 0.9}})
    assert data == {"steps": 3, "optim": {"lr": 0.1}} and dropped == ["optim.momentum"]
    assert from_dict(Run, data).optim.lr == 0.1


def test_a_key_written_twice_is_refused_at_any_depth(tmp_path):
    """PyYAML keeps the last of two equal keys silently: a second `optim:` section would drop the first."""
    path = tmp_path / "twice.yaml"
    for text, message in (("optim:\n  lr: 0.5\nsteps: 3\noptim:\n  kind: sgd\n", r"key 'optim' appears twice "
                                                                                   r"\(lines 1 and 4\); keep one"),
                          ("optim:\n  lr: 0.5\n  lr: 0.1\n", r"key 'lr' appears twice \(lines 2 and 3\)"),
                          ("optim: {lr: 0.5, lr: 0.1}\n", r"key 'lr' appears twice \(lines 1 and 1\)")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=rf"config file {path}: {message}"):
            load_config(Run, path)
    with pytest.raises(ConfigError, match=r"override 'optim=\{lr: 1, lr: 2\}': key 'lr' appears twice"):
        load_config(Run, None, ["optim={lr: 1, lr: 2}"])
    path.write_text("optim:\n  <<: {lr: 0.5, kind: sgd}\n  lr: 0.1\n")  # a merge key's values may still be overridden
    assert (load_config(Run, path).optim.lr, load_config(Run, path).optim.kind) == (0.1, "sgd")


def test_set_below_a_value_or_with_broken_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 0.5\n")
    for file in (path, None):  # the value set in the file (was a TypeError) or not set at all
        with pytest.raises(ConfigError, match=r"optim.lr is a value, not a section \(in --set 'optim.lr.x=1'\): "
                                              r"write --set optim.lr=VALUE"):
            load_config(Run, file, ["optim.lr.x=1"])
    with pytest.raises(ConfigError, match=r"override 'layers=\[1,': the value is not valid YAML"):
        load_config(Run, None, ["layers=[1,"])


@dataclass
class Sections:
    extra: dict = field(default_factory=dict)
    run: Run = field(default_factory=Run)


def test_set_still_reaches_into_sections_and_dicts():
    cfg = load_config(Sections, None, ["extra.a.b=1", "run.optim.lr=0.2"])
    assert cfg.extra == {"a": {"b": 1}} and cfg.run.optim.lr == 0.2
    with pytest.raises(ConfigError, match="extra.a is a value, not a section"):
        load_config(Sections, None, ["extra.a=1", "extra.a.b=1"])


@pytest.mark.parametrize("override, message", [
    ("name=no", r"name: expected a string, got False; YAML reads unquoted yes, no, on, off, true and false as "
                r"true/false: quote it to keep it text, e.g. \"no\" \(on the command line: --set 'name=\"no\"'\)"),
    ("name=2024", r"name: expected a string, got 2024; YAML reads it as a number: .*--set 'name=\"2024\"'"),
    ("layers=3,4", r"layers: expected a list, got '3,4'; write a list in brackets, \[3, 4\] \(on the command "
                   r"line: --set 'layers=\[3, 4\]'\)"),
])
def test_a_value_yaml_read_otherwise_says_what_to_type(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Run, None, [override])
    assert load_config(Run, None, ['name="no"', "layers=[3, 4]"]).name == "no"


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../../etc", "a\\b", " run", "run "])
def test_a_run_name_must_be_a_plain_folder_name(name):
    from workflows.recipe import RunSection

    with pytest.raises(ConfigError, match=r"run: run.name names the run's folder under run.storage_path .*give a "
                                          r"plain folder name"):
        from_dict(RunSection, {"name": name}, prefix="run.")
    assert from_dict(RunSection, {"name": "k400-b16_8x16f.v2"}, prefix="run.").name == "k400-b16_8x16f.v2"


def test_a_misspelled_option_is_named_first_with_the_closest_one(capsys):
    """argparse reported `--manfest` as "the following arguments are required: --manifest", and an unknown option of
    a subcommand with its parent's usage; the workflows' parser names it, with the option meant, in the
    subcommand's own usage. Abbreviations argparse accepts still work."""
    from workflows.config_loader import config_parser
    from workflows.data.cli import main as data_main

    for argv, said in ((["check", "--manfest", "x.csv"], "python -m workflows data check: error: unrecognized option "
                                                          "--manfest (did you mean --manifest?)"),
                       (["check", "--manifest", "x.csv", "--jsn"], "unrecognized option --jsn (did you mean --json?)"),
                       (["import", "folders", "--vidoes", "v", "--out", "o"], "python -m workflows data import "
                                                                              "folders: error: unrecognized option "
                                                                              "--vidoes (did you mean --videos?)")):
        with pytest.raises(SystemExit) as info:
            data_main(argv)
        assert info.value.code == 2 and said in capsys.readouterr().err
    parser = config_parser("python -m workflows pretrain", "d", "recipe", "override")
    parser.add_argument("--check", action="store_true")
    with pytest.raises(SystemExit):
        parser.parse_args(["--confg", "r.yaml"])
    assert "unrecognized option --confg (did you mean --config?)" in capsys.readouterr().err
    args = parser.parse_args(["--conf", "r.yaml", "--set", "train.lr=1", "--che"])  # prefixes, as argparse allows
    assert (args.config, args.overrides, args.check) == ("r.yaml", ["train.lr=1"], True)
