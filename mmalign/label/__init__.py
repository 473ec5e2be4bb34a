"""`mmalign label DIR`: a local web page to label the pairs of `mmalign sample --label-pairs`.

The store (store.py) keeps the answers in DIR/pairs.jsonl, each written atomically under a
file lock as it is given; the app (app.py) is a Starlette app served by uvicorn on 127.0.0.1;
the page (page.py) shows the two samples side by side with keyboard shortcuts.
"""

from mmalign.label.store import LabelError, LabelStore

__all__ = ["LabelError", "LabelStore"]
