"""tools/benchmark_input_size.py: the speed/size table of the guide (issue 14.2)."""

from pathlib import Path

import pytest

from detect.cli import benchmark_input_size as bench
from detect.data.voc import VOCDataset
from detect.input_size import size_statistics
from tests.conftest import make_voc_tree

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "faster_rcnn" / "tiny_custom.yaml"


def test_table_has_the_coverage_of_each_size_and_ratios_to_the_first(tmp_path, capsys):
    root = tmp_path / "voc"
    _, names = make_voc_tree(root, num_images=6, seed=1)
    records = VOCDataset(root, "test", classes=names).records
    out = tmp_path / "sizes.md"
    table = bench.run(bench.parse_args(["--config", str(CONFIG), "--set", f"data.root={root}", "--set",
                                        "data.train_split=test", "--sizes", "64,128", "--iters", "1", "--images",
                                        "1", "--repeats", "1", "--threads", "1", "--out", str(out)]))
    assert out.read_text() == table + "\n" and table in capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| 64") or line.startswith("| 128")]
    assert [r[0].strip() for r in rows] == [f"64 / {bench.longer_side(records, 64)}",
                                             f"128 / {bench.longer_side(records, 128)}"]
    for row, short in zip(rows, (64, 128)):
        stats = size_statistics(records, names, min_size=short, max_size=bench.longer_side(records, short))
        assert row[1].strip().startswith(f"{1 - stats[-1].under_16:.1%} / ")   # all objects >= 16 px at this size
        assert row[2].strip().startswith(f"{1 - stats[-1].under_32:.1%} / ")
        worst = min(1 - r.under_32 for r in stats[:-1] if r.count)
        assert f" / {worst:.1%} (" in row[2]
    assert rows[0][4].strip() == "1.00x" and rows[0][6].strip() == "1.00x"
    assert float(rows[1][3]) > 0 and float(rows[1][4].strip().rstrip("x")) > 0


def test_longer_side_keeps_the_widest_image_unshrunk(tmp_path):
    root = tmp_path / "voc"
    _, names = make_voc_tree(root, num_images=6, seed=2)
    records = VOCDataset(root, "test", classes=names).records
    aspect = max(max(r.width, r.height) / min(r.width, r.height) for r in records)
    long = bench.longer_side(records, 256)
    assert long % 32 == 0 and long >= 256 * aspect and long - 32 < 256 * aspect
    assert bench.longer_side(records, 2000) == 2000            # never below the shorter side


@pytest.mark.parametrize("argv", [["--sizes", "a,b"], ["--sizes", "16"], ["--iters", "0"]])
def test_bad_arguments_are_one_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--config", str(CONFIG), *argv])
    assert exit_info.value.code == 2 and "error:" in capsys.readouterr().err
