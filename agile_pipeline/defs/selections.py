"""The named jobs and the asset selections of their runs, by name — defined once, here.

``defs/concepts.py`` builds the jobs from these names; the app's triggers (``labeling_ui``)
ask for runs and partial runs by them without importing Dagster. No Dagster import here.
"""

CONCEPT_PARTITIONS = "concepts"  # the dynamic partitions definition: one partition per concept

START_JOB = "concept_start_job"
START_ASSETS = ("expansion_candidates", "zero_shot_scores")

ROUND_JOB = "concept_round_job"
ROUND_ASSETS = ("classifier", "al_candidates", "registered_model", "eval_set", "model_metrics",
                "concept_predictions")
# what the round job runs when only part of it is wanted (``asset_selection`` of a run):
# the round on the batch's full labels after a lookahead round already queued the next batch
FOLLOWUP_ASSETS = ("classifier", "registered_model", "eval_set", "model_metrics",
                   "concept_predictions")
# a lookahead round: train, select the next batch, register; the eval work is the follow-up's
LOOKAHEAD_ASSETS = ("classifier", "al_candidates", "registered_model")
# re-scored after the eval set is rated
EVAL_ASSETS = ("eval_set", "model_metrics", "concept_predictions")
# the corpus scored with the champion (after a corpus refresh: a sensor starts it per concept)
PREDICTIONS_JOB = "concept_predictions_job"
