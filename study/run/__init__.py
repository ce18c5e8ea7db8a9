"""One training run, read top to bottom: spec.py (what a run is), step.py (the step and evaluation),
state.py and checkpoint.py (its state and their files), divergence.py (the NaN policy), loop.py (the
epochs), engine.py (find or create the run, resume, lead or follow under torchrun)."""
