"""``metarec eval``: the prequential protocol over the services' own learner, the
baselines, the scenarios and the robustness suite (docs/EVALUATION.md)."""
