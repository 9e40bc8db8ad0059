"""Compare the plain recipe with a zero-shot prior blended into the classifier (issue 9).

Run from the repo root after `agile ingest .agile/demo_corpus` (with AGILE_HOME set): prints
mean AUC-PR after expansion and two AL rounds for each prior weight β.
"""

from agile_pipeline.research.simulate import SimConfig, run_all, summarize
from agile_pipeline.runner import prepare_simulation


def main() -> None:
    data = prepare_simulation(".agile/demo_corpus")
    names = sorted(data.positives)
    for beta in (0.0, 0.3, 1.0):
        res = run_all(data, names, SimConfig(rounds=2, zero_shot_prior=beta), progress=False)
        s = summarize(res)["all"]
        print(  # noqa: T201
            f"beta={beta}: zero-shot {s['zero_shot_auc_pr_mean']:.3f}, AUC-PR per round "
            + ", ".join(f"{r['auc_pr_mean']:.3f}" for r in s["rounds"])
        )


if __name__ == "__main__":
    main()
