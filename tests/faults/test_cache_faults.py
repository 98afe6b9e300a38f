"""Caches and stores under corruption and kill -9: the R-CNN feature cache and the proposal store.

A truncated or bit-flipped shard or record is detected and recomputed (or named in a one-line
error), never used; a run killed with SIGKILL at a random moment and then resumed gives files
bitwise equal to an uninterrupted run and leaves no temp file behind. Trial delays are drawn from
a seeded generator and printed, so a failing trial can be replayed (``FAULT_SEED=<seed> pytest ...``).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from detect.config import load_config
from detect.data.voc import VOCDataset
from detect.feature_cache import FeatureCache, FeatureCacheError
from detect.proposal_sources import FixedProposals
from detect.build import build_model
from detect.rcnn_training import extract_features, fit_regression_stage, fit_svm_stage
from proposals import cli as proposals_cli
from proposals.compute import compute_store, search_params
from proposals.store import MERGED_NAME, ProposalStore
from tests.conftest import make_voc_tree
from tests.faults.hostile import flip_byte, kill_at, kill_self_on, temp_files, truncate

REPO = Path(__file__).resolve().parents[2]
RCNN_TINY = REPO / "configs" / "rcnn" / "tiny_synthetic.yaml"
NAMES = ["cat", "dog"]
KILL_TRIALS = 4


def _trial_seed() -> int:
    """A fresh seed per run (printed; failures show it), or FAULT_SEED to replay one."""
    return int(os.environ.get("FAULT_SEED") or int.from_bytes(os.urandom(2), "little"))


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- the R-CNN feature cache


@pytest.fixture(scope="module")
def rcnn_setup(tmp_path_factory):
    """A tiny R-CNN with fixed proposals, 8 VOC images, and a reference cache from one uninterrupted run."""
    base = tmp_path_factory.mktemp("rcnn")
    make_voc_tree(base / "voc", num_images=8)
    records = VOCDataset(base / "voc", "test", classes=NAMES).records
    cfg = load_config(RCNN_TINY, ["rcnn.crop_size=32", "rcnn.context_padding=2", "rcnn.svm.retrain_limit=20",
                                  "data.classes=[cat,dog]"])
    torch.manual_seed(0)
    model = build_model(cfg, class_names=NAMES)
    rng = np.random.default_rng(0)
    boxes = {}
    for r in records:
        xy = rng.uniform(0, 40, (30, 2))
        boxes[r.image_id] = np.concatenate([xy, xy + rng.uniform(8, 40, (30, 2))], 1).astype(np.float32)
    model.proposals.source = FixedProposals(boxes_by_id=boxes)
    fingerprint = {"model_weights": "tiny", "proposal_set": "fixed"}
    reference = base / "reference"
    extract_features(model, records, FeatureCache(reference, fingerprint=fingerprint), log=lambda m: None)
    return {"model": model, "records": records, "cfg": cfg, "fingerprint": fingerprint, "reference": reference,
            "base": base}


def _copy_of_reference(setup, name: str) -> Path:
    root = setup["base"] / name
    shutil.copytree(setup["reference"], root)
    return root


def _key_of(root: Path, suffix: str, index: int = 0) -> Path:
    return sorted(root.glob(f"*{suffix}"))[index]


@pytest.mark.parametrize("damage", ["flip_features", "flip_pool5", "truncate_features", "flip_info"])
def test_a_damaged_shard_is_named_on_read_and_recomputed_by_the_feature_stage(rcnn_setup, damage):
    root = _copy_of_reference(rcnn_setup, f"damaged_{damage}")
    image_id = rcnn_setup["records"][2].image_id
    cache = FeatureCache(root, fingerprint=rcnn_setup["fingerprint"])
    key = cache._key(image_id)
    target = {"flip_features": f"{key}.feat.npy", "flip_pool5": f"{key}.pool5.npy",
              "truncate_features": f"{key}.feat.npy", "flip_info": f"{key}.info.npz"}[damage]
    if damage == "truncate_features":
        truncate(root / target, -6)
    elif damage == "flip_info":
        data = (root / target).read_bytes()
        boxes = cache.get(image_id).boxes                     # flip a byte inside the stored boxes array
        flip_byte(root / target, data.index(boxes.tobytes()) + 5)
    else:
        flip_byte(root / target, -3)                          # inside the last feature row
    fresh = FeatureCache(root, fingerprint=rcnn_setup["fingerprint"])
    with pytest.raises(FeatureCacheError) as info:
        fresh.get(image_id)
    assert target in str(info.value) and "rerun the feature stage" in str(info.value)
    assert not fresh.valid(image_id) and fresh.valid(rcnn_setup["records"][1].image_id)
    lines = []
    done = extract_features(rcnn_setup["model"], rcnn_setup["records"], fresh, log=lines.append)
    assert done["computed"] == 1 and done["skipped"] == len(rcnn_setup["records"]) - 1
    assert any("corrupt" in line and image_id in line for line in lines)
    assert _snapshot(root) == _snapshot(rcnn_setup["reference"])


def test_svm_and_box_regression_stages_are_bitwise_reproducible(rcnn_setup):
    setup = rcnn_setup
    ids = [r.image_id for r in setup["records"]]
    runs = []
    for _ in range(2):
        np.random.seed(len(runs))           # the unseeded LinearSVC drew liblinear's seed from here
        cache = FeatureCache(setup["reference"], fingerprint=setup["fingerprint"])
        svm = fit_svm_stage(setup["model"], cache, ids, setup["cfg"], log=lambda m: None)
        reg = fit_regression_stage(setup["model"], cache, ids, setup["cfg"], log=lambda m: None)
        runs.append((svm, reg))
    (svm_a, reg_a), (svm_b, reg_b) = runs
    assert svm_a.fitted.all() and svm_a.retrainings >= 2 and reg_a.fitted.any()
    assert svm_a.weight.tobytes() == svm_b.weight.tobytes() and svm_a.bias.tobytes() == svm_b.bias.tobytes()
    assert reg_a.weight.tobytes() == reg_b.weight.tobytes() and reg_a.bias.tobytes() == reg_b.bias.tobytes()


def test_feature_caching_killed_at_random_moments_resumes_to_the_same_files(rcnn_setup):
    setup = rcnn_setup
    seed = _trial_seed()
    rng = np.random.default_rng(seed)
    print(f"feature cache kill trials: seed {seed}")

    def run(root: Path) -> int:
        extract_features(setup["model"], setup["records"], FeatureCache(root, fingerprint=setup["fingerprint"]),
                         log=lambda m: None)
        return 0

    start = time.perf_counter()
    run(setup["base"] / "timing")
    duration = time.perf_counter() - start
    for trial in range(KILL_TRIALS + 1):
        root = setup["base"] / f"killed_{trial}"
        if trial < KILL_TRIALS:
            delay = float(rng.uniform(0, duration))
            print(f"  trial {trial}: SIGKILL after {delay * 1000:.0f} ms of {duration * 1000:.0f}")
            kill_at(lambda: run(root), delay)
        else:                             # inside an atomic write: the 3rd info file's temp is never renamed
            print("  trial inside a write: SIGKILL at the 3rd info file's rename")

            def killed_in_a_write() -> int:
                kill_self_on(os, "replace", when=lambda src, dst: str(dst).endswith(".info.npz"), call=3)
                return run(root)

            assert kill_at(killed_in_a_write, 30.0)
            assert temp_files(root)                           # the kill did leave a temp file ...
        run(root)
        assert temp_files(root) == []                         # ... and the resumed run removed it
        assert _snapshot(root) == _snapshot(setup["reference"])


# --------------------------------------------------------------------------- the proposal store


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("proposals") / "voc"
    make_voc_tree(root, num_images=8)
    return root


PARAMS = search_params(mode="single", top_k=50)
CLI_PARAMS = ["--mode", "single", "--top-k", "50", "--no-progress"]


def _items(root: Path):
    return [(r.image_id, r.path) for r in VOCDataset(root, "test", classes=NAMES).records]


@pytest.fixture(scope="module")
def reference_store(voc_root, tmp_path_factory):
    store = ProposalStore(tmp_path_factory.mktemp("ref"), "voc-test", PARAMS)
    compute_store(_items(voc_root), store, progress=False)
    return store.directory


def _cli(*args: str) -> int:
    return proposals_cli.main(list(args))


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_proposal_eval_says_the_store_is_damaged_and_compute_repairs_it(voc_root, tmp_path, capsys, damage):
    store = tmp_path / "store"
    source = ["--voc", str(voc_root), "--split", "test", "--store", str(store), *CLI_PARAMS]
    assert _cli("compute", *source) == 0
    capsys.readouterr()
    assert _cli("eval", *source) == 0
    good = capsys.readouterr().out
    merged = next(store.rglob(MERGED_NAME))
    if damage == "flip":
        flip_byte(merged, merged.stat().st_size // 2)        # inside some record's boxes
    else:
        truncate(merged, -7)                                  # the last record loses its tail
    assert _cli("eval", *source) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "proposal store is damaged" in err[0] and str(merged) in err[0]
    assert _cli("compute", *source) == 0                      # recomputes the bad record
    assert "1 computed" in capsys.readouterr().out
    assert _cli("eval", *source) == 0
    assert capsys.readouterr().out == good                    # the same recall as before the damage


def test_proposal_compute_killed_at_random_moments_resumes_to_the_same_store(voc_root, reference_store, tmp_path):
    seed = _trial_seed()
    rng = np.random.default_rng(seed)
    print(f"proposal store kill trials: seed {seed}")
    items = _items(voc_root)

    def run(root: Path) -> int:
        return compute_store(items, ProposalStore(root, "voc-test", PARAMS), progress=False).computed

    start = time.perf_counter()
    run(tmp_path / "timing")
    duration = time.perf_counter() - start
    expected = _snapshot(reference_store)
    for trial in range(KILL_TRIALS + 1):
        root = tmp_path / f"killed_{trial}"
        if trial < KILL_TRIALS:
            delay = float(rng.uniform(0, duration))
            print(f"  trial {trial}: SIGKILL after {delay * 1000:.0f} ms of {duration * 1000:.0f}")
            kill_at(lambda: run(root), delay)
        else:                              # inside the merge: the merged file's temp is never renamed
            print("  trial inside a write: SIGKILL at the merged file's rename")

            def killed_in_the_merge() -> int:
                kill_self_on(os, "replace", when=lambda src, dst: str(dst).endswith(MERGED_NAME))
                return run(root)

            assert kill_at(killed_in_the_merge, 30.0)
            assert temp_files(root)
        run(root)
        directory = root / "voc-test" / reference_store.name
        assert temp_files(root) == [] and not list(directory.glob("part-*"))
        assert _snapshot(directory) == expected
