"""Images/second of the streaming embedder against a plain decode-then-infer loop.

Makes N synthetic 640×480 JPEGs (noise plus random shapes; decode cost like real photos),
then embeds them three ways, alternating ``--repeat`` times and reporting the best of each:
one image at a time (open, preprocess, embed: the straightforward loop), ``sequential_embed``
(one thread: decode a batch, then infer it) and ``EmbeddingRun`` (what ingestion runs: decode
in worker threads, overlapped with batched inference). Load from other processes skews
both: check ``uptime`` first.

    python scripts/embed_throughput.py --n 500            # bundled encoder
    python scripts/embed_throughput.py --spec random:32   # pipeline overhead only
    python scripts/embed_throughput.py --encoder bundled-int8 --reference bundled --batch-size 16
        # the int8 image tower against the fp32 one

``--encoder`` is another name for ``--spec``. ``--reference SPEC`` also runs SPEC's per-image
loop in every round (so both see the same load), reports each of ``--spec``'s best figures as
a multiple of it, and the cosine of ``--spec``'s vectors to SPEC's. The first
``bundled-int8`` load on a machine calibrates the int8 network (~30-60 s); later loads read it
from the disk cache.
"""

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` synthetic JPEG photos (640×480) in ``folder``, reused when already there."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"img_{i:05d}.jpg"
        paths.append(path)
        if path.exists():
            continue
        base = rng.integers(0, 256, size=3)
        noise = rng.normal(0, 40, size=(480, 640, 3))
        arr = np.clip(base + noise, 0, 255).astype(np.uint8)
        image = Image.fromarray(arr)
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x0, y0 = rng.integers(0, 560), rng.integers(0, 400)
            box = (
                int(x0),
                int(y0),
                int(x0 + rng.integers(20, 200)),
                int(y0 + rng.integers(20, 200)),
            )
            fill = tuple(int(c) for c in rng.integers(0, 256, size=3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        image.save(path, quality=90)
    return paths


def load(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def per_image_embed(items: list[tuple[str, Path]], encoder: object) -> tuple[float, np.ndarray]:
    """The loop most people write first: open, preprocess and embed one image at a time."""
    import time

    start = time.perf_counter()
    vecs = [encoder.embed_images([load(path)])[0] for _, path in items]  # type: ignore[attr-defined]
    return len(items) / (time.perf_counter() - start), np.stack(vecs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", "--encoder", dest="spec", default="bundled")
    parser.add_argument(
        "--reference",
        default=None,
        help="baseline encoder spec (e.g. bundled): its per-image loop runs in every round",
    )
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument(
        "--dir", type=Path, default=Path(tempfile.gettempdir()) / "agile-throughput"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from agile_pipeline.lib.embedding import EmbeddingRun, sequential_embed
    from agile_pipeline.lib.encoders import load_encoder

    paths = make_images(args.dir, args.n)
    items = [(p.stem, p) for p in paths]
    encoder = load_encoder(args.spec)
    encoder.embed_images([load(paths[0])] * 2)  # warm-up
    reference = load_encoder(args.reference) if args.reference else None
    if reference is not None:
        reference.embed_images([load(paths[0])] * 2)
    out(
        f"{encoder.model_id}: {len(items)} JPEGs 640x480, batch {args.batch_size}, cpus {os.cpu_count()}"
    )
    out(f"load average before: {os.getloadavg()[0]:.2f}")
    best_seq = best_pipe = best_one = best_ref = 0.0
    vec_ref = None
    for r in range(args.repeat):
        if reference is not None:
            ref_ips, vec_ref = per_image_embed(items, reference)
            best_ref = max(best_ref, ref_ips)
            out(f"round {r + 1}: reference {reference.model_id} per-image {ref_ips:6.1f} img/s")
        one_ips, vec_one = per_image_embed(items, encoder)
        best_one = max(best_one, one_ips)
        _, vec_seq, seq = sequential_embed(items, load, encoder, batch_size=args.batch_size)
        best_seq = max(best_seq, seq.images_per_second)
        run = EmbeddingRun(
            items, load, encoder, batch_size=args.batch_size, workers=args.workers, progress=False
        )
        vec_pipe = np.concatenate([b.vectors for b in run.batches()])
        best_pipe = max(best_pipe, run.stats.images_per_second)
        same = np.allclose(vec_seq, vec_pipe, atol=1e-5) and np.allclose(vec_one, vec_pipe, atol=1e-4)
        out(
            f"round {r + 1}: per-image {one_ips:6.1f} img/s   sequential {seq.images_per_second:6.1f} img/s   "
            f"pipelined (workers={args.workers}) {run.stats.images_per_second:6.1f} img/s   "
            f"same vectors: {same}"
        )
    out(f"best: per-image {best_one:.1f} img/s, sequential {best_seq:.1f} img/s, "
        f"pipelined {best_pipe:.1f} img/s ({best_pipe / best_one:.1f}x per-image, "
        f"{best_pipe / best_seq:.1f}x sequential)")
    if reference is not None and vec_ref is not None:
        out(f"against the reference's per-image loop ({best_ref:.1f} img/s): per-image "
            f"{best_one / best_ref:.2f}x, sequential {best_seq / best_ref:.2f}x, "
            f"pipelined {best_pipe / best_ref:.2f}x")
        cos = (vec_ref * vec_pipe).sum(axis=1)
        out(f"cosine to {reference.model_id}: mean {cos.mean():.4f}, min {cos.min():.4f}")
    out(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
