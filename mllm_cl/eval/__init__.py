"""Scoring: per-sample benchmark rules (``rules.RULES``, modes official/clean) and corpus-level caption scores
(``captions.caption_average``)."""
