"""Every console script in setup.cfg resolves, and each has a tools/ twin that runs from a checkout."""

import configparser
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def console_scripts() -> dict[str, str]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    lines = [line.strip() for line in parser["options.entry_points"]["console_scripts"].splitlines() if line.strip()]
    return dict(tuple(part.strip() for part in line.split("=", 1)) for line in lines)


@pytest.mark.parametrize("name, target", sorted(console_scripts().items()))
def test_console_script_resolves(name, target):
    module, func = target.split(":")
    assert callable(getattr(importlib.import_module(module), func))


def test_each_console_script_has_a_tools_script():
    tools = {p.stem for p in (ROOT / "tools").glob("*.py")}
    for name in console_scripts():
        assert name.removeprefix("detect-").replace("-", "_") in tools, name


def test_tools_run_from_a_checkout_without_installation(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "eval.py"), "--help"], cwd=tmp_path,
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0 and "--detections" in out.stdout


def test_importing_the_library_downloads_nothing(monkeypatch):
    import torch.hub

    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    for module in ("detect", "detect.data", "detect.evaluation", "proposals"):
        importlib.reload(importlib.import_module(module))
