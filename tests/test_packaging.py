"""Every console script in setup.cfg resolves, and each has a tools/ twin that runs from a checkout."""

import configparser
import importlib
import json
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


# Run in a fresh interpreter: every module of detect/ and proposals/ is imported under an audit hook
# that records (and refuses) any network access; TORCH_HOME is empty, so a module-level
# torch.hub / torchvision weights download cannot be served from a cache and has to reach the network.
_IMPORT_ALL = """
import importlib, json, sys
attempts = []
NETWORK = ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "urllib.Request")

def guard(event, args):
    if event in NETWORK:
        attempts.append(event + " " + repr(args)[:200])
        raise ConnectionRefusedError("network access while importing the library")

sys.addaudithook(guard)
failed = {}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except BaseException as exc:
        failed[name] = repr(exc)[:300]
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("detect", "proposals"))
print(json.dumps({"attempts": attempts, "failed": failed, "loaded": loaded}))
"""


def library_modules() -> list[str]:
    names = []
    for package in ("detect", "proposals"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_importing_every_module_downloads_nothing(tmp_path):
    modules = library_modules()
    assert {"detect.backbones", "detect.cli.train", "proposals.selective_search"} <= set(modules)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(tmp_path),
           "TORCH_HOME": str(tmp_path / "torch"), "MPLCONFIGDIR": str(tmp_path / "mpl")}
    out = subprocess.run([sys.executable, "-c", _IMPORT_ALL, *modules], cwd=tmp_path, capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["attempts"] == [] and report["failed"] == {}
    assert set(modules) <= set(report["loaded"])
