"""The drawing page of ``python -m lenet_xp.serve``: its HTTP server (:mod:`.server`), its
JSON API (:mod:`.api`), the memory allowance of pictures being decoded (:mod:`.budget`) and
the page's files (``static/``)."""
