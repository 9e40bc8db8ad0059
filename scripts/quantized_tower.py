"""The int8 image tower (``bundled-int8``) against the fp32 one (``bundled``), on real images.

Embeds the demo corpus (OpenMoji artwork labelled with Unicode subgroups; ``agile demo-corpus``
writes it, default ``$AGILE_HOME/demo_corpus``) and the sample photos that installed packages
ship with both encoders and reports:

* cosine of each int8 image vector to its fp32 one (all images; the emoji that are not in the
  calibration sample; the photos);
* zero-shot average precision (area under the precision-recall curve) per concept, fp32 vs
  int8, with every Unicode subgroup of >= 10 images as a concept phrased as its name
  ("animal-mammal" -> "animal mammal");
* seconds per image of the image network alone (preprocessed input, batch 1 and 16);
* with ``--ablate 0,2,8``: the same cosines and timings for int8 networks built with that many
  leading convolutions kept in float32 (how ``FP32_LEADING_CONVS`` was chosen).

    python scripts/quantized_tower.py                      # everything in the demo corpus
    python scripts/quantized_tower.py --limit 400 --ablate 0,1,2,4,8,12

Load from other processes skews the timings (not the cosines or APs): check ``uptime``.
"""

import argparse
import csv
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = (
    "matplotlib/mpl-data/sample_data/grace_hopper.jpg",
    "gradio/media_assets/images/cheetah.jpg",
    "gradio/media_assets/images/cheetah1.jpg",
    "gradio/media_assets/images/lion.jpg",
    "gradio/media_assets/images/tower.jpg",
    "gradio/media_assets/images/bus.png",
    "sklearn/datasets/images/flower.jpg",
    "sklearn/datasets/images/china.jpg",
)


def out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def load_corpus(folder: Path, limit: int | None) -> tuple[list[Path], list[str], list[str]]:
    """(paths, subgroups, OpenMoji keys) from the demo corpus's labels.csv, evenly thinned."""
    with (folder / "labels.csv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if limit and limit < len(rows):
        step = len(rows) / limit
        rows = [rows[int(i * step)] for i in range(limit)]
    return (
        [folder / r["path"] for r in rows],
        [r["subgroup"] for r in rows],
        [r["codepoints"] for r in rows],
    )


def photo_crops(rng: np.random.Generator, per_photo: int) -> list[Image.Image]:
    """The package-shipped photos, each whole and as ``per_photo`` random crops."""
    site = Path(np.__file__).resolve().parent.parent
    images = []
    for rel in PHOTOS:
        path = site / rel
        if not path.exists():
            continue
        with Image.open(path) as image:
            photo = image.convert("RGB")
        images.append(photo)
        w, h = photo.size
        for _ in range(per_photo):
            s = rng.uniform(0.3, 0.8)
            cw, ch = int(w * s), int(h * s)
            x, y = int(rng.integers(0, w - cw)), int(rng.integers(0, h - ch))
            images.append(photo.crop((x, y, x + cw, y + ch)))
    return images


def embed(encoder: object, batch: np.ndarray, size: int = 16) -> np.ndarray:
    return np.concatenate(
        [encoder.embed_preprocessed(batch[i : i + size]) for i in range(0, len(batch), size)]  # type: ignore[attr-defined]
    )


def seconds_per_image(fn: object, batch: np.ndarray, repeat: int) -> tuple[float, float]:
    """Best-of-``repeat`` seconds per image of ``fn`` at batch 1 and batch 16."""
    result = []
    for size, runs in ((1, 16), (16, 2)):
        x = batch[:size]
        fn(x)  # type: ignore[operator]
        best = float("inf")
        for _ in range(repeat * runs):
            start = time.perf_counter()
            fn(x)  # type: ignore[operator]
            best = min(best, (time.perf_counter() - start) / size)
        result.append(best)
    return result[0], result[1]


def ablation_vectors(session: object, batch: np.ndarray, center: np.ndarray) -> np.ndarray:
    """Centred, L2-normalised vectors from an ONNX Runtime session of the image network."""
    feats = np.concatenate(
        [session.run(None, {"x": batch[i : i + 16]})[0] for i in range(0, len(batch), 16)]  # type: ignore[attr-defined]
    )
    feats = feats - center
    return feats / np.linalg.norm(feats, axis=1, keepdims=True)


def describe(cos: np.ndarray) -> str:
    return f"mean {cos.mean():.4f}  min {cos.min():.4f}  p1 {np.percentile(cos, 1):.4f}"


def zero_shot(fp32: object, int8: object, v32: np.ndarray, v8: np.ndarray, groups: list[str],
              per_concept: bool) -> None:
    from sklearn.metrics import average_precision_score

    labels = np.array(groups)
    names, counts = np.unique(labels, return_counts=True)
    concepts = [str(n) for n, c in zip(names, counts, strict=True) if c >= 10]
    phrases = [c.replace("-", " ") for c in concepts]
    t32 = fp32.embed_texts(phrases)  # type: ignore[attr-defined]
    t8 = int8.embed_texts(phrases)  # type: ignore[attr-defined]
    text_same = np.allclose(t32, t8, atol=1e-6)
    s32, s8 = v32 @ t32.T, v8 @ t8.T
    ap32, ap8, base = [], [], []
    if per_concept:
        out(f"  {'concept':26s} {'n':>4s} {'AP fp32':>8s} {'AP int8':>8s} {'diff':>7s}")
    for j, concept in enumerate(concepts):
        y = labels == concept
        ap32.append(float(average_precision_score(y, s32[:, j])))
        ap8.append(float(average_precision_score(y, s8[:, j])))
        base.append(float(y.mean()))
        if per_concept:
            out(f"  {concept:26s} {y.sum():4d} {ap32[-1]:8.4f} {ap8[-1]:8.4f} {ap8[-1] - ap32[-1]:+7.4f}")
    a32, a8 = np.array(ap32), np.array(ap8)
    top32, top8 = np.argsort(-s32, axis=0)[:10], np.argsort(-s8, axis=0)[:10]
    overlap = np.mean([len(set(top32[:, j]) & set(top8[:, j])) / 10 for j in range(len(concepts))])
    out(f"zero-shot, {len(concepts)} subgroups (>= 10 images), text vectors identical: {text_same}")
    out(f"  mean AP fp32 {a32.mean():.4f}  int8 {a8.mean():.4f}  (base rate {np.mean(base):.4f})")
    out(f"  |AP int8 - AP fp32|: mean {np.abs(a8 - a32).mean():.4f}  max {np.abs(a8 - a32).max():.4f}"
        f"  int8 higher in {(a8 > a32).sum()}, lower in {(a8 < a32).sum()}")
    out(f"  top-10 overlap per concept: {overlap:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, default=None,
                        help="demo corpus folder (default $AGILE_HOME/demo_corpus)")
    parser.add_argument("--limit", type=int, default=None, help="use this many corpus images")
    parser.add_argument("--crops", type=int, default=9, help="random crops per sample photo")
    parser.add_argument("--repeat", type=int, default=3, help="timing repeats (best of)")
    parser.add_argument("--per-concept", action="store_true", help="print every concept's AP")
    parser.add_argument("--ablate", default="", help="comma-separated FP32_LEADING_CONVS values")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from agile_pipeline.lib import quantized_encoder as q
    from agile_pipeline.lib.encoders import load_encoder
    from agile_pipeline.settings import data_home

    corpus = args.corpus or data_home() / "demo_corpus"
    if not (corpus / "labels.csv").is_file():
        raise SystemExit(f"no demo corpus at {corpus}: run `agile demo-corpus` or pass --corpus")
    out(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, cpus {os.cpu_count()}")
    fp32 = load_encoder("bundled")
    fp32.ensure_image_tower()
    start = time.perf_counter()
    int8 = load_encoder("bundled-int8")
    int8.ensure_image_tower()  # calibrates now, or reads the disk cache
    out(f"int8 encoder loaded in {time.perf_counter() - start:.1f} s "
        f"({'calibrated now' if int8.calibrated else 'from the disk cache'}: {int8.cache_path})")

    paths, groups, keys = load_corpus(corpus, args.limit)
    x = np.stack([fp32.preprocess(Image.open(p)) for p in paths])
    photos = np.stack([fp32.preprocess(im) for im in photo_crops(np.random.default_rng(1), args.crops)])
    calib = {p.stem for p in q.calibration_svgs()}
    held_out = np.array([k not in calib and k.replace("-FE0F", "") not in calib for k in keys])

    v32, v8 = embed(fp32, x), embed(int8, x)
    p32, p8 = embed(fp32, photos), embed(int8, photos)
    cos, pcos = (v32 * v8).sum(axis=1), (p32 * p8).sum(axis=1)
    out(f"{int8.model_id} vs {fp32.model_id}, cosine of image vectors:")
    out(f"  demo corpus, {len(cos)} images:              {describe(cos)}")
    out(f"  of them not in the calibration set ({held_out.sum()}): {describe(cos[held_out])}")
    out(f"  sample photos and crops ({len(pcos)}):         {describe(pcos)}")

    t32 = seconds_per_image(fp32.pooled_features, x, args.repeat)
    t8 = seconds_per_image(int8.pooled_features, x, args.repeat)
    out("image network only (preprocessed input), ms/image:")
    out(f"  fp32 TorchScript: batch 1 {1000 * t32[0]:.2f}, batch 16 {1000 * t32[1]:.2f}")
    out(f"  int8 ONNX Runtime: batch 1 {1000 * t8[0]:.2f}, batch 16 {1000 * t8[1]:.2f}"
        f"  ({t32[0] / t8[0]:.1f}x / {t32[1] / t8[1]:.1f}x)")

    zero_shot(fp32, int8, v32, v8, groups, args.per_concept)

    for k in [int(v) for v in args.ablate.split(",") if v.strip()]:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "int8.onnx"
            start = time.perf_counter()
            q.build_int8_onnx(fp32._image_model, fp32, path, fp32_leading_convs=k)
            built = time.perf_counter() - start
            session = q.open_session(path, required=True)
        c = (ablation_vectors(session, x, fp32._feature_center) * v32).sum(axis=1)
        pc = (ablation_vectors(session, photos, fp32._feature_center) * p32).sum(axis=1)
        t = seconds_per_image(lambda b, s=session: s.run(None, {"x": b})[0], x, args.repeat)
        out(f"ablation fp32_leading_convs={k:2d} (built in {built:.0f} s): held-out emoji "
            f"{describe(c[held_out])} | photos {describe(pc)} | ms/image b1 {1000 * t[0]:.2f} "
            f"b16 {1000 * t[1]:.2f}")
    out(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
