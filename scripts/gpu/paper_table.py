"""Write the GPU check's paper-size stability table (step paper-stability of scripts/gpu/check.sh):

    python scripts/gpu/paper_table.py TRACKING_URI EXPERIMENT OUT.csv

one row per run of ``run_study.py ablation paper-stability`` (analysis.transfer.paper_check_table), with
the date and the device. Commit it as studies/transfer/paper-stability.csv: the transfer report reads
it beside its prediction for the paper's size."""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere


def main(argv: list[str]) -> int:
    from analysis.collect import NoRunsError, collect_runs
    from analysis.transfer import config_keys, paper_check_table, plain_value
    from study.config import unflatten
    from study.data import load_splits
    from study.store import Store

    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    uri, experiment, out = argv
    try:
        runs, history, _ = collect_runs(Store(uri), experiment)
    except NoRunsError as e:
        print(f"paper_table: {e}", file=sys.stderr)
        return 1
    flat = {k: plain_value(runs.iloc[0][k]) for k in config_keys(runs)}
    train_images = len(load_splits(unflatten(flat).data).train)
    table = paper_check_table(runs, history, train_images, datetime.date.today().isoformat())
    import torch

    if torch.cuda.is_available():  # which GPU, not just "cuda": the table is committed with it
        name = torch.cuda.get_device_name(0)
        table["device"] = [f"{d} ({name})" if str(d).startswith("cuda") else d for d in table["device"]]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    print(table.to_string(index=False))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
