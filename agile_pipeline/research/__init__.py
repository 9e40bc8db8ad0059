"""Research and evaluation tools that drive the product library; not part of the product.

* :mod:`~agile_pipeline.research.simulate` — the simulated user (paper section 5): ground-truth
  labels play the rater while the loop's own functions from :mod:`agile_pipeline.lib` (the round
  policy, expansion sampling, the training recipe and first-model rule, margin selection, the
  stratified eval set, zero-shot calibration) run every round (``agile simulate``,
  ``scripts/*_ablation.py``);
* :mod:`~agile_pipeline.research.few_shot` — few-label training variants the simulator compares
  with the paper's recipe (``agile simulate --few-shot``);
* :mod:`~agile_pipeline.research.unseen_dataset` — a generated labeled dataset of rare,
  text-unfriendly concepts to simulate on (``agile demo-corpus --kind glyphs``).

Dependencies point one way: this package imports :mod:`agile_pipeline.lib`, and nothing in
``agile_pipeline/lib`` imports this package. What the product itself needs (reading a labeled
dataset for ``runner.prepare_simulation``) lives in :mod:`agile_pipeline.lib.labeled_dataset`.
"""
