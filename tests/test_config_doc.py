"""Every config key has a one-line meaning; --print-config shows each key's type and the config's own value."""

import re
from pathlib import Path

import yaml

from detect import config_doc
from detect.config import load_config
from detect.config_doc import HELP, field_keys, format_markdown, missing_help, type_name

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "faster_rcnn" / "tiny_custom.yaml"


def _value(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def test_every_field_has_a_meaning():
    # Fails when a field is added to detect/config.py without a line in detect/config_doc.HELP (or one is
    # renamed and its line is left behind): the README's key table would silently lose it.
    assert missing_help() == []
    assert len(field_keys()) == len(HELP) > 150


def test_a_field_without_a_meaning_is_reported(monkeypatch):
    # missing_help itself must see a gap: drop one meaning, add one for a key that does not exist
    table = dict(HELP)
    del table["model.rpn.nms_thresh"]
    table["model.rpn.nms_tresh"] = "typo"
    monkeypatch.setattr(config_doc, "HELP", table)
    assert missing_help() == ["no meaning for 'model.rpn.nms_thresh'", "meaning for unknown key 'model.rpn.nms_tresh'"]


def test_type_names_are_those_a_yaml_writer_needs():
    from detect.config import Config, DataConfig, InputConfig
    import typing

    hints = {**typing.get_type_hints(DataConfig), **{f"input.{k}": v for k, v in typing.get_type_hints(InputConfig).items()}}
    assert type_name(hints["format"]) == "voc|coco|synthetic"
    assert type_name(hints["classes"]) == "list[str] | str"
    assert type_name(hints["input.min_size"]) == "list[int]"
    assert type_name(hints["input.auto_min_object"]) == "float"
    assert type_name(typing.get_type_hints(Config)["source"]) == "str"


def test_print_config_shows_every_key_with_the_values_after_overrides(capsys):
    from detect.cli.train import main

    overrides = ["train.lr=0.005", "model.input.min_size=[320, 352]", "data.classes=[a, b]", "data.root=/some/dir"]
    argv = ["--config", str(CONFIG), "--print-config"]
    for o in overrides:
        argv += ["--set", o]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    cfg = load_config(CONFIG, overrides)
    rows = {}
    for line in lines[2:]:                      # after the header and its rule
        key, kind, value, meaning = re.split(r"\s{2,}", line, maxsplit=3)
        rows[key] = (kind, yaml.safe_load(value), meaning)
    assert list(rows) == field_keys()           # every key once, in file order
    for key, (kind, value, meaning) in rows.items():
        expected = _value(cfg, key)
        assert value == expected and type(value) is type(expected), key
        assert meaning == HELP[key]
    assert rows["train.lr"][1] == 0.005 and rows["model.input.min_size"][1] == [320, 352]
    assert rows["data.classes"][1] == ["a", "b"] and rows["data.root"][1] == "/some/dir"
    assert rows["model.input.auto"][1] is True and rows["model.backbone.name"][1] == "tiny8"   # from the file
    assert rows["model.rpn.nms_thresh"][0] == "float" and rows["data.format"][0] == "voc|coco|synthetic"


def test_print_config_does_not_train(tmp_path, capsys, monkeypatch):
    from detect.cli.train import main

    monkeypatch.chdir(tmp_path)
    # data.root points nowhere: reading the dataset would fail, so exit 0 means nothing was read
    assert main(["--config", str(CONFIG), "--print-config", "markdown", "--set", "data.root=/does/not/exist"]) == 0
    assert not (tmp_path / "runs").exists()
    out = capsys.readouterr().out
    assert out.startswith("| key | type | default | meaning |\n|---|---|---|---|\n")


def test_markdown_table_escapes_pipes_and_has_a_row_per_key():
    cfg = load_config(CONFIG)
    table = format_markdown(cfg).splitlines()
    assert len(table) == 2 + len(field_keys())
    row = next(r for r in table if r.startswith("| `data.format` |"))
    assert row == f"| `data.format` | voc\\|coco\\|synthetic | `voc` | {HELP['data.format']} |"
    # every row has exactly 4 cells once escaped pipes are discounted
    assert all(len(re.split(r"(?<!\\)\|", r)) == 6 for r in table)


def test_print_config_reports_a_bad_override_in_one_line(capsys):
    from detect.cli.train import main

    assert main(["--config", str(CONFIG), "--print-config", "--set", "train.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'train.lrr'" in err and len(err.strip().splitlines()) == 1


def test_help_lines_are_one_line():
    long = [key for key, text in HELP.items() if "\n" in text or len(text) > 200]
    assert long == []
