"""Per-browser-session state kept by Gradio (``gr.State``): small, immutable, deep-copyable.

Shared resources (the state store, the pipeline trigger) live in the
:class:`~labeling_ui.service.LabelingService`, never here. The rating loop's own state (the
cursor, prefetched images, the unsent-ratings outbox) lives in the browser, so a rater's work
survives a reload, a closed tab or an app restart.
"""

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class LabelingSession:
    """Which concept this browser tab works on, and who is signed in (auth on)."""

    concept: str | None = None
    user: str | None = None
    purpose: str = "train"
    nonce: int = 0

    def with_concept(self, concept: str | None) -> "LabelingSession":
        return replace(self, concept=concept, nonce=self.nonce + 1)

    def with_user(self, user: str | None) -> "LabelingSession":
        return replace(self, user=user)

    def bumped(self) -> "LabelingSession":
        """A new nonce: tells the rating widget to reload its batch."""
        return replace(self, nonce=self.nonce + 1)
