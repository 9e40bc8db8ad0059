"""Data-quality checks of a concept's round (Dagster runs them as asset checks).

Each returns ``(passed, metadata)`` with the figures a platform team would look at.
"""

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from agile_pipeline.lib.state import StateStore


def classifier_weights_finite(model_dir: Path) -> tuple[bool, dict[str, Any]]:
    """Every weight of the saved classifier is a finite number (no NaN or inf)."""
    import torch

    state = torch.load(Path(model_dir) / "model.pt", map_location="cpu", weights_only=True)
    bad = {k: int((~torch.isfinite(v)).sum()) for k, v in state.items() if v.is_floating_point()}
    bad = {k: n for k, n in bad.items() if n}
    n_params = int(sum(v.numel() for v in state.values()))
    return not bad, {"parameters": n_params, "non_finite": sum(bad.values()),
                     "tensors_with_non_finite": sorted(bad)}


def batch_of_unlabeled_train_images(
    store: StateStore, concept: str, batch_id: int, *, batch_size: int, eligible: int,
) -> tuple[bool, dict[str, Any]]:
    """The batch holds ``min(batch_size, eligible)`` distinct train images, none of them
    labelled when it was selected."""
    batch = store.get_batch(batch_id)
    if batch is None:
        return False, {"problem": f"batch {batch_id} not found"}
    ids = [it["image_id"] for it in batch["items"]]
    splits = {r["id"]: r["split"] for r in store.image_rows(ids)}
    not_train = [i for i in ids if splits.get(i) != "train"]
    labeled_then = store.labeled_image_ids(concept, upto=int(batch["label_cutoff"]))
    relabeled = [i for i in ids if i in labeled_then]
    expected = min(batch_size, eligible)
    passed = len(ids) == expected and len(set(ids)) == len(ids) and not not_train and not relabeled
    return passed, {"images": len(ids), "expected": expected, "duplicates": len(ids) - len(set(ids)),
                    "not_in_train_split": len(not_train), "already_labeled": len(relabeled)}


def strata_filled(
    counts: Mapping[str, Sequence[int]], sizes: Mapping[str, Sequence[int]], per_stratum: int,
) -> tuple[bool, dict[str, Any]]:
    """Every model's every score stratum contributed ``per_stratum`` images, or all it had."""
    short: list[str] = []
    thin: list[str] = []
    for model, row in counts.items():
        for s, (got, size) in enumerate(zip(row, sizes.get(model, []), strict=False)):
            if got < min(per_stratum, size):
                short.append(f"{model}@{s}")
            elif size < per_stratum:
                thin.append(f"{model}@{s}")
    return not short, {
        "models": len(counts), "underfilled_strata": short,
        # explained: a stratum with fewer test images than per_stratum gives all it has
        "strata_with_fewer_images_than_per_stratum": len(thin),
    }


def beats_zero_shot(report: Mapping[str, Any]) -> tuple[bool, dict[str, Any]]:
    """The newest model's AUC-PR on the eval ratings is at least zero-shot's (passes, saying
    so, while nothing is rated yet)."""
    rows = list(report.get("models", []))
    models = [r for r in rows if r["model"] != "zero-shot"]
    zero = next((r for r in rows if r["model"] == "zero-shot"), None)
    if not models or zero is None or not report.get("n_eval_labels"):
        return True, {"status": "nothing to compare yet: rate the eval set"}
    latest = max(models, key=lambda r: r["round"])
    a, z = float(latest["auc_pr"]), float(zero["auc_pr"])
    if math.isnan(a) or math.isnan(z):
        return True, {"status": "AUC-PR undefined (the eval ratings hold one class only)"}
    return a >= z, {"model": latest["model"], "auc_pr": round(a, 4), "zero_shot_auc_pr": round(z, 4),
                    "eval_labels": int(report["n_eval_labels"])}
