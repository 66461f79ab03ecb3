"""The drawing page of ``python -m lenet_xp.serve``: its JSON API (:mod:`.api`) and the
page's files (``static/``)."""
