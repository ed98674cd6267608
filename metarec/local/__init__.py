"""A laptop's deployment: the local Tansu broker and Redis, ``metarec demo``, and
``metarec bench`` (the ``local`` extra)."""
