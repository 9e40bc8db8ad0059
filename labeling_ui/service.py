"""The app's backend, assembled: one :class:`LabelingService` per app process builds the parts
and exposes them by what they serve.

* ``service.ratings`` (:class:`~labeling_ui.ratings.Ratings`): concepts, the batch view of the
  rating widget, label writes, who rated what;
* ``service.batches`` (:class:`~labeling_ui.batches.Batches`): the batches raters rate and the
  counts of their ratings (read by ratings and rounds);
* ``service.rounds`` (:class:`~labeling_ui.rounds.Rounds`): the runs the app asks the pipeline
  for, their progress, the rounds trained, and the automatic-round policy;
* ``service.export`` (:class:`~labeling_ui.export.ModelExport`): model downloads and the
  evaluation's report and plot;
* ``service.exemplars`` (:class:`~labeling_ui.exemplar_search.ExemplarSearch`): exemplars
  (picked or uploaded) and the image search that finds them.

The service is shared by every session and every HTTP request of an app process (it holds the
state store and the pipeline trigger, which are shared resources and are never put in
``gr.State``). The parts' methods are plain Python, raise
:class:`~agile_pipeline.lib.state.StateError` with a user-facing message for anything the user
can fix, and are tested directly.

Data ownership: the app is the single writer of label events (through the multi-process-safe
``StateStore``); every batch, model and round is written by the concept jobs, which the app only
*asks* to run, through the :class:`~labeling_ui.trigger.PipelineTrigger`.
"""

from pathlib import Path

from agile_pipeline.lib.state import StateStore
from labeling_ui.batches import Batches
from labeling_ui.context import ServiceContext
from labeling_ui.exemplar_search import ExemplarSearch
from labeling_ui.export import ModelExport
from labeling_ui.ratings import Ratings
from labeling_ui.rounds import RoundPolicy, Rounds
from labeling_ui.trigger import PipelineTrigger


class LabelingService:
    """The composition root: builds the shared :class:`ServiceContext` and the parts that
    receive it (see the module docstring); the parts call each other through the references
    given here, never through the service."""

    def __init__(
        self,
        store: StateStore,
        trigger: PipelineTrigger,
        *,
        home: Path,
        fallback: PipelineTrigger | None = None,
        encoder_spec: str = "bundled",
        status_cache_s: float = 0.75,
        policy: RoundPolicy | None = None,
    ) -> None:
        self.context = ServiceContext(store, Path(home), encoder_spec)
        self.store = self.context.store
        self.home = self.context.home
        self.batches = Batches(store)
        self.exemplars = ExemplarSearch(self.context)
        self.rounds = Rounds(self.context, self.batches, trigger, fallback=fallback,
                             status_cache_s=status_cache_s, policy=policy)
        self.ratings = Ratings(self.context, self.batches, self.rounds, self.exemplars)
        self.export = ModelExport(self.context, self.rounds)
