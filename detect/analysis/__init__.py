"""Seeing what a detector does.

* :mod:`~detect.analysis.curves`: precision-recall curves, AP by class, by object size and by flag;
* :mod:`~detect.analysis.error_analysis`: false-positive types of Hoiem et al. (ECCV 2012) and what each costs;
* :mod:`~detect.analysis.confusion`: the class-confusion matrix, precision / recall / F1 at a score threshold and
  the best-F1 threshold per class;
* :mod:`~detect.analysis.dataset_stats` and :mod:`~detect.analysis.training_log`: a split's class and object-size
  distributions, a run's curves from ``metrics.jsonl``;
* :mod:`~detect.analysis.occlusion`: occlusion sensitivity of one detection (Zeiler & Fergus 2013, Sec. 4.2);
* :mod:`~detect.analysis.deconvnet`: projecting trunk activations back to pixels (Zeiler & Fergus 2013, Sec. 2.1);
* :mod:`~detect.analysis.samples`, :mod:`~detect.analysis.html`, :mod:`~detect.analysis.report` and
  :mod:`~detect.analysis.report_sections`: drawn detections and the self-contained HTML run report
  (``tools/analyze.py``; one image: ``tools/explain.py``);
* :mod:`~detect.analysis.trunk`: a plain conv trunk as named layers with their receptive fields;
* ``python -m detect.analysis.benchmark``: occlusion-map speed against the naive way.
"""
