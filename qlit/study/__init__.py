"""Studies: running a grid of runs (``qlit sweep``), reading them back and comparing them (``qlit compare``,
``qlit board``), writing their report.

The modules import downward only: ``techniques`` (what a config amounts to) ← ``runs`` (runs read back from their
event files) ← ``report`` ← ``compare`` and ``sweep`` (the commands); ``board`` reads ``runs``.
"""
