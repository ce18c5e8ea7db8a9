"""Many runs through Optuna and MLflow: driver.py schedules, ablation.py and lrsearch.py define what."""
