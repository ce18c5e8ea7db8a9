"""Timing only, outside the harness's core: the training-step bench (timing.py), the usual
reproduction's stand-in that the speed targets are measured against (usual_repro.py), each
optimisation before and after (optimisations.py), and the report's speed (report_speed.py). Nothing in
study/ or analysis/ imports from here."""
