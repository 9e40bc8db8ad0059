"""The Dagster code location: ``dagster dev -w workspace.yaml`` loads ``defs``."""

import dagster as dg


@dg.definitions
def defs() -> dg.Definitions:
    from agile_pipeline.defs import concepts, corpus
    from agile_pipeline.defs.resources import AgileHome

    return dg.Definitions(
        assets=[
            corpus.image_manifest,
            corpus.train_test_assignment,
            corpus.image_embeddings,
            concepts.concept_labels,
            concepts.expansion_candidates,
            concepts.zero_shot_scores,
            concepts.classifier,
            concepts.al_candidates,
            concepts.registered_model,
            concepts.eval_set,
            concepts.model_metrics,
        ],
        asset_checks=[corpus.image_embeddings_complete, corpus.image_manifest_unique_ids],
        jobs=[corpus.corpus_refresh_job, corpus.vectors_housekeeping_job, concepts.concept_start_job, concepts.concept_round_job],
        schedules=[corpus.corpus_refresh_schedule, corpus.vectors_housekeeping_schedule],
        sensors=[corpus.new_images_sensor],
        resources={"agile": AgileHome()},
    )
