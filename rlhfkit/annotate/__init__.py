"""Human preference annotation: a web app that shows comparison pairs to people, tracks agreement
and annotator quality, and exports PreferenceRecords the trainers read directly.

Modules: ``server`` / ``web`` / ``views_annotator`` / ``views_admin`` / ``views_review`` /
``views_setup`` (FastAPI app), ``store`` (per-request database operations) with ``queries`` (its
prebuilt SQL), ``labels`` (one's own answers) and ``projects`` (admin operations, ``store.admin``),
``models`` + ``migrations/`` (schema), ``db`` (connections), ``assignment`` (who sees what next),
``agreement`` (pure-numpy statistics), ``quality`` (intervals, trends, thresholds), ``stats``
(project figures), ``review`` (item browser, adjudication), ``export`` (PreferenceRecords),
``imports`` (input files), ``ratings`` (per-reply rating schema), ``markdown`` (inert rendering),
``values`` (the store's value types). Nothing is imported here, so ``rlhfkit.annotate.agreement``
works without the web dependencies installed. The command line, ``rlhfkit annotate ...``, is
``rlhfkit/cli/annotate.py``.

Layering: this package imports only ``rlhfkit.data``, ``ops``, ``config``, ``tracking``,
``evaluate.stats`` and itself (``tests/test_annotate_layers.py`` checks it).
"""
