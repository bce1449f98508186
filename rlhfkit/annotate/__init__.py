"""Human preference annotation: a web app that shows comparison pairs to people, tracks agreement
and annotator quality, and exports PreferenceRecords the trainers read directly.

Modules: ``cli`` (``rlhfkit annotate ...``), ``server`` / ``views_*`` / ``web`` (FastAPI app),
``store`` (database operations), ``models`` + ``migrations/`` (schema), ``db`` (connections),
``assignment`` (who sees what next), ``agreement`` (pure-numpy statistics), ``stats`` (project
figures), ``export`` (PreferenceRecords), ``imports`` (input files). Nothing is imported here, so
``rlhfkit.annotate.agreement`` works without the web dependencies installed.
"""
