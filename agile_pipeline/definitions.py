"""The Dagster code location: ``dagster dev -w workspace.yaml`` loads ``defs``.

:func:`definitions_for` is the one list of assets, checks, jobs, schedules and sensors; the
code location binds it to the resources over ``$AGILE_HOME``, and the in-process runner
(:mod:`agile_pipeline.runner`) to the resources it is given.
"""

from typing import TYPE_CHECKING

import dagster as dg

if TYPE_CHECKING:
    from agile_pipeline.defs.resources import AgileResources


def definitions_for(resources: "AgileResources") -> dg.Definitions:
    """The project's definitions with ``resources`` bound (state, vectors, encoder)."""
    from agile_pipeline.defs import concepts, corpus

    return dg.Definitions(
        assets=[
            corpus.image_manifest,
            corpus.train_test_assignment,
            corpus.image_embeddings,
            corpus.embedding_index,
            corpus.neighbour_graph,
            concepts.concept_labels,
            concepts.expansion_candidates,
            concepts.zero_shot_scores,
            concepts.classifier,
            concepts.al_candidates,
            concepts.registered_model,
            concepts.eval_set,
            concepts.model_metrics,
            concepts.concept_predictions,
        ],
        asset_checks=[corpus.image_embeddings_complete, corpus.image_manifest_unique_ids],
        jobs=[corpus.corpus_refresh_job, corpus.vectors_housekeeping_job,
              concepts.concept_start_job, concepts.concept_round_job,
              concepts.concept_predictions_job],
        schedules=[corpus.corpus_refresh_schedule, corpus.vectors_housekeeping_schedule],
        sensors=[corpus.new_images_sensor, concepts.predictions_after_refresh],
        resources=resources.as_dict(),
    )


@dg.definitions
def defs() -> dg.Definitions:
    from agile_pipeline.defs.resources import AgileResources

    # state, vectors and encoder over $AGILE_HOME; the encoder spec from the settings
    return definitions_for(AgileResources())
