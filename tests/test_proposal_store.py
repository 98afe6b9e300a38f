"""The proposal store: round trip, versions, resume after a kill, corruption, failures, shards, workers, CLI."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from detect.data.image import read_image
from detect.data.voc import VOCDataset
from detect.errors import DetectError
from proposals import selective_search
from proposals.cli import main as cli_main
from proposals.compute import compute_store, parse_shard, search_kwargs, search_params
from proposals.recall import evaluate_recall
from proposals.store import HEADER, MERGED_NAME, ProposalStore, ProposalStoreError, iter_records

from tests.conftest import make_voc_tree

PARAMS = search_params(mode="single", top_k=50)


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "voc"
    ids, _ = make_voc_tree(root, num_images=6)
    return [(i, root / "JPEGImages" / f"{i}.jpg") for i in ids]


def expected(path: Path) -> np.ndarray:
    return selective_search(read_image(path), **search_kwargs(PARAMS))


def test_compute_then_load_by_id(images, tmp_path):
    store = ProposalStore(tmp_path / "store", "voc-test", PARAMS)
    summary = compute_store(images, store, progress=False)
    assert (summary.total, summary.computed, summary.skipped, summary.failed) == (6, 6, 0, {})
    files = sorted(p.name for p in store.directory.iterdir())
    assert files == ["index.json", "params.json", MERGED_NAME]          # one data file for the split
    reopened = ProposalStore(tmp_path / "store", "voc-test", dict(PARAMS))
    assert len(reopened) == 6 and set(reopened.ids()) == {i for i, _ in images}
    for image_id, path in images[::-1]:
        boxes = reopened.get(image_id)
        assert boxes.dtype == np.float32 and 0 < len(boxes) <= 50
        np.testing.assert_array_equal(boxes, expected(path))
    with pytest.raises(ProposalStoreError, match="never computed"):
        reopened.get("nope")
    assert json.loads((store.directory / "params.json").read_text())["params"]["mode"] == "single"


def test_a_changed_parameter_never_reuses_old_boxes(images, tmp_path):
    compute_store(images, ProposalStore(tmp_path, "s", PARAMS), progress=False)
    changed = ProposalStore(tmp_path, "s", search_params(mode="single", top_k=50, min_box_size=11))
    assert changed.version != ProposalStore(tmp_path, "s", PARAMS).version
    assert len(changed) == 0
    with pytest.raises(ProposalStoreError):
        changed.get(images[0][0])
    # spelling a default out gives the same version: only effective values count
    same = search_params(mode="single", top_k=50, ks=[100], similarities=["C+T+S+F"], colour_spaces=["HSV"])
    assert ProposalStore(tmp_path, "s", same).version == ProposalStore(tmp_path, "s", PARAMS).version


def test_resume_after_a_kill_recomputes_only_missing_images(images, tmp_path, monkeypatch):
    store = ProposalStore(tmp_path, "s", PARAMS)
    import proposals.compute as compute

    real_work, calls = compute._work, []

    def dying_work(item):
        if len(calls) == 3:
            raise KeyboardInterrupt                      # the run is killed after three images
        calls.append(item[0])
        return real_work(item)

    monkeypatch.setattr(compute, "_work", dying_work)
    with pytest.raises(KeyboardInterrupt):
        compute_store(images, store, progress=False)
    part = store.directory / "part-00000-of-00001.bin"
    with open(part, "ab") as handle:                     # ... in the middle of writing a fourth record
        handle.write(HEADER.pack(b"PRP1", 0, 4, 10, 160, 0) + b"img9" + b"\0" * 20)
    monkeypatch.setattr(compute, "_work", real_work)
    summary = compute_store(images, ProposalStore(tmp_path, "s", PARAMS), progress=False)
    assert summary.skipped == 3 and summary.computed == 3
    assert any("truncated" in p for p in summary.problems)
    store = ProposalStore(tmp_path, "s", PARAMS)
    assert len(store) == 6 and "img9" not in store
    for image_id, path in images:
        np.testing.assert_array_equal(store.get(image_id), expected(path))


def test_corrupt_records_are_detected_and_recomputed(images, tmp_path):
    store = ProposalStore(tmp_path, "s", PARAMS)
    compute_store(images, store, progress=False)
    data = store.directory / MERGED_NAME
    raw = bytearray(data.read_bytes())
    victim = store._load_index()[images[2][0]]
    raw[victim.offset + 5] ^= 0xFF                        # flip bits inside one image's boxes
    data.write_bytes(bytes(raw))
    fresh = ProposalStore(tmp_path, "s", PARAMS)
    with pytest.raises(ProposalStoreError, match="corrupt"):
        fresh.get(images[2][0])
    np.testing.assert_array_equal(fresh.get(images[0][0]), expected(images[0][1]))
    summary = compute_store(images, ProposalStore(tmp_path, "s", PARAMS), progress=False)
    assert summary.computed == 1 and any("checksum" in p for p in summary.problems)
    np.testing.assert_array_equal(ProposalStore(tmp_path, "s", PARAMS).get(images[2][0]), expected(images[2][1]))
    # a file cut short: the index no longer matches, the lost records are recomputed
    data = store.directory / MERGED_NAME
    data.write_bytes(data.read_bytes()[:-30])
    summary = compute_store(images, ProposalStore(tmp_path, "s", PARAMS), progress=False)
    assert summary.computed == 1 and len(ProposalStore(tmp_path, "s", PARAMS)) == 6


def test_unreadable_images_are_recorded_and_retried(images, tmp_path):
    broken = images[1][1]
    good = broken.read_bytes()
    broken.write_bytes(good[:200])                        # truncated JPEG
    store = ProposalStore(tmp_path, "s", PARAMS)
    summary = compute_store(images, store, progress=False)
    assert list(summary.failed) == [images[1][0]] and summary.computed == 5
    assert str(broken) in summary.failed[images[1][0]]
    store = ProposalStore(tmp_path, "s", PARAMS)
    assert images[1][0] in store.failed() and images[1][0] not in store
    with pytest.raises(ProposalStoreError, match="failed"):
        store.get(images[1][0])
    broken.write_bytes(good)                              # fixed: the next run retries only that image
    summary = compute_store(images, ProposalStore(tmp_path, "s", PARAMS), progress=False)
    assert summary.computed == 1 and summary.skipped == 5 and not summary.failed
    store = ProposalStore(tmp_path, "s", PARAMS)
    assert len(store) == 6 and store.failed() == {}


def test_shards_then_merge_equal_one_run(images, tmp_path):
    for shard in ((0, 3), (1, 3), (2, 3)):
        summary = compute_store(images, ProposalStore(tmp_path / "a", "s", PARAMS), shard=shard, progress=False)
        assert summary.total == 2
    store = ProposalStore(tmp_path / "a", "s", PARAMS)
    assert len(sorted(store.directory.glob("part-*.bin"))) == 3 and len(store) == 6
    store.merge()
    assert [p.name for p in store.directory.glob("*.bin")] == [MERGED_NAME]
    single = ProposalStore(tmp_path / "b", "s", PARAMS)
    compute_store(images, single, progress=False)
    assert (store.directory / MERGED_NAME).read_bytes() == (single.directory / MERGED_NAME).read_bytes()
    assert [r[0] for r in iter_records(single.directory / MERGED_NAME)] == sorted(i for i, _ in images)


def test_shard_option_and_torchrun_environment(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert parse_shard(None) == (0, 1) and parse_shard("2/5") == (2, 5)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert parse_shard(None) == (3, 4)
    # the project's error (a tool prints it as one line and exits 2), naming the bad value
    for bad, message in (("5/5", "--shard 5/5: need 0 <= i < n"), ("0/0", "--shard 0/0: need 0 <= i < n"),
                         ("1-2", "--shard must look like i/n (e.g. 0/4), got '1-2'")):
        with pytest.raises(DetectError, match=re.escape(message)):
            parse_shard(bad)


def test_one_writer_per_shard(tmp_path):
    store = ProposalStore(tmp_path, "s", PARAMS)
    store.prepare()
    with store.writer(0, 1):
        with pytest.raises(ProposalStoreError, match="another process"):
            with store.writer(0, 1):
                pass


def test_worker_processes_give_the_same_boxes(images, tmp_path):
    store = ProposalStore(tmp_path, "s", PARAMS)
    summary = compute_store(images[:4], store, workers=2, progress=False)
    assert summary.computed == 4
    store = ProposalStore(tmp_path, "s", PARAMS)
    for image_id, path in images[:4]:
        np.testing.assert_array_equal(store.get(image_id), expected(path))


def test_cli_compute_eval_show(tmp_path, capsys):
    root = tmp_path / "voc"
    _, names = make_voc_tree(root, num_images=3)
    common = ["--voc", str(root), "--split", "test", "--store", str(tmp_path / "store"), "--mode", "single"]
    assert cli_main(["compute", *common, "--no-progress"]) == 0
    assert "3 computed" in capsys.readouterr().out
    assert cli_main(["compute", *common, "--no-progress"]) == 0
    assert "3 already there, 0 computed" in capsys.readouterr().out
    plot, report = tmp_path / "recall.png", tmp_path / "recall.json"
    assert cli_main(["eval", *common, "--plot", str(plot), "--json", str(report)]) == 0
    assert "recall@0.5" in capsys.readouterr().out and plot.is_file()
    # the recall of the split's boxes, computed here from the images with the parameters the tool reports
    saved = json.loads(report.read_text())
    records = VOCDataset(root, "test", classes=names).records
    boxes = {r.image_id: selective_search(read_image(r.path), **search_kwargs(saved["params"])) for r in records}
    again = evaluate_recall(records, boxes, names)
    assert saved["params"]["mode"] == "single" and saved["num_objects"] == again["num_objects"] > 0
    assert 0 < saved["mabo"] < 1 and saved["mabo"] == pytest.approx(again["mabo"], abs=1e-9)
    assert saved["recall@0.5"] == pytest.approx(again["recall@0.5"], abs=1e-9)
    out = tmp_path / "shown.png"
    assert cli_main(["show", *common, "--id", "img1", "--out", str(out)]) == 0
    assert read_image(out).shape == read_image(root / "JPEGImages" / "img1.jpg").shape
    assert cli_main(["compute", "--folder", str(tmp_path / "nothing"), "--store", str(tmp_path / "s")]) == 2
    assert "image folder not found" in capsys.readouterr().err


def test_cli_on_a_coco_split_and_an_image_folder(tmp_path, capsys):
    from detect.data.convert import voc_to_coco

    root = tmp_path / "voc"
    make_voc_tree(root, num_images=2)
    voc_to_coco(root, "test", tmp_path / "instances.json")
    store = ["--store", str(tmp_path / "store"), "--mode", "single", "--no-progress"]
    assert cli_main(["compute", "--coco", str(tmp_path / "instances.json"), "--images", str(root / "JPEGImages"),
                     *store]) == 0
    assert "2 computed" in capsys.readouterr().out
    coco = ProposalStore(tmp_path / "store", "instances", search_params(mode="single", top_k=2000))
    assert sorted(coco.ids()) == ["1", "2"]                          # COCO image ids
    assert cli_main(["compute", "--folder", str(root / "JPEGImages"), "--name", "pics", *store]) == 0
    folder = ProposalStore(tmp_path / "store", "pics", search_params(mode="single", top_k=2000))
    assert sorted(folder.ids()) == ["img0", "img1"]
    np.testing.assert_array_equal(folder.get("img1"), coco.get("2"))


def test_shards_filled_on_separate_machines_merge_into_one_store(tmp_path, capsys):
    """The README's recipe for several machines without a shared disk: each fills its shard into its own store
    (``--shard i/n --no-merge``), the part files are copied into one folder, ``merge`` joins them. Catches part
    names that collide across machines or a merge that drops records of parts it did not write."""
    import shutil

    root = tmp_path / "voc"
    make_voc_tree(root, num_images=5)
    common = ["--voc", str(root), "--split", "test", "--mode", "single", "--top-k", "50", "--no-progress"]
    for i in range(3):                                         # machine i, its own disk
        assert cli_main(["compute", *common, "--store", str(tmp_path / f"machine{i}"), "--shard", f"{i}/3",
                         "--no-merge"]) == 0
    version = ProposalStore(tmp_path / "machine0", "voc-test", search_params(mode="single", top_k=50)).directory
    gathered = tmp_path / "gathered" / version.relative_to(tmp_path / "machine0")
    gathered.mkdir(parents=True)
    for i in range(3):
        for part in (tmp_path / f"machine{i}" / version.relative_to(tmp_path / "machine0")).glob("part-*.bin"):
            shutil.copy(part, gathered / part.name)
    assert len(list(gathered.glob("part-*.bin"))) == 3
    capsys.readouterr()
    assert cli_main(["merge", *common[:-1], "--store", str(tmp_path / "gathered")]) == 0
    assert "5 images, 0 failed" in capsys.readouterr().out
    assert cli_main(["compute", *common, "--store", str(tmp_path / "one")]) == 0
    one = ProposalStore(tmp_path / "one", "voc-test", search_params(mode="single", top_k=50)).directory
    assert (gathered / MERGED_NAME).read_bytes() == (one / MERGED_NAME).read_bytes()


def test_filling_says_what_it_computes_with_train_workers_by_default(tmp_path, monkeypatch):
    """ensure_stored_proposals (what tools/train.py calls) uses train.workers processes unless told otherwise, and
    compute_store says what it is about to do. Catches the old default of one process."""
    import proposals.compute as compute
    from detect.config import Config
    from detect import proposal_sources
    from detect.proposal_sources import ensure_stored_proposals

    root = tmp_path / "voc"
    make_voc_tree(root, num_images=3)
    cfg = Config()
    cfg.data.root, cfg.data.classes, cfg.data.train_split = str(root), ["cat", "dog"], "test"
    cfg.proposals.store, cfg.proposals.mode, cfg.proposals.top_k = str(tmp_path / "s"), "single", 7
    cfg.train.workers = 3
    seen = {}
    real = compute.compute_store
    monkeypatch.setattr(proposal_sources, "compute_store", lambda items, store, **kw: seen.update(kw) or real(
        items, store, **{**kw, "workers": 1}))
    lines = []
    ensure_stored_proposals(cfg, "test", log=lines.append)
    assert seen["workers"] == 3 and seen["shard"] == (0, 1)
    version = ProposalStore(tmp_path / "s", "voc-test", compute.search_params(mode="single", top_k=7)).version
    assert lines == [f"proposals: 3 of 3 images to compute into {tmp_path / 's' / 'voc-test' / version} "
                     "(ours 'single' mode, max side 1000, top 7; 1 process(es))"]
    ensure_stored_proposals(cfg, "test", workers=1, log=lines.append)
    assert seen["workers"] == 1 and len(lines) == 1              # nothing left to compute: nothing said
