"""The labeling app (Gradio + FastAPI).

Gradio's usage analytics (which call home) stay off in this app: ``GRADIO_ANALYTICS_ENABLED``
is set to ``False`` here, before any module of the app imports gradio (unless the environment
already sets it), and the Blocks are built with ``analytics_enabled=False`` whatever it says.
"""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
