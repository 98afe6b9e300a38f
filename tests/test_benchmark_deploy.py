"""``benchmark_torchvision.py --mode deploy --interleave``: every variant timed by turns in one process."""

from detect.cli.benchmark_deploy import VARIANTS, measure_interleaved
from detect.data.synthetic import generate_synthetic


def test_interleaved_times_each_variant_on_every_image(tmp_path, monkeypatch):
    root = generate_synthetic(tmp_path / "images", num_images=8, seed=0, empty_fraction=0.0)
    calls = []
    import detect.cli.benchmark_deploy as bd
    real = bd._runner

    def counting(variant, *args):
        run = real(variant, *args)

        def wrapped(im):
            calls.append((variant, tuple(im.shape)))
            return run(im)
        return wrapped

    monkeypatch.setattr(bd, "_runner", counting)
    variants = ["torchvision eager fp32", "ours eager fp32"]
    spec = dict(setting="tiny", variants=variants, root=str(root), images=3, passes=2, calibrate=0, threads=1,
                overrides=[], size=128)
    result = measure_interleaved(spec)
    assert set(result) == set(variants) and set(variants) <= set(VARIANTS)
    assert all(r["ms"] > 0 and r["warmup_s"] > 0 for r in result.values())
    timed = calls[2 * len(variants):]                      # after the two warm-up images of each variant
    assert len(timed) == 2 * 3 * len(variants)
    for n in range(6):                                     # each image goes through every variant before the next
        turn = timed[n * len(variants):(n + 1) * len(variants)]
        assert {v for v, _ in turn} == set(variants)
        assert len({shape for _, shape in turn}) == 1
    assert timed[0][0] != timed[len(variants)][0]          # the order rotates from one image to the next
