"""Where a training run's metrics go: history.tsv, TensorBoard and, when asked, MLflow."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from pipeline.common import atomic
from pipeline.common.errors import InputError


class Trackers:
    """Metrics per epoch: ``history.tsv`` and TensorBoard always, MLflow with ``tracking: mlflow``
    (a file store in ``out_dir/mlflow``, no server: ``mlflow ui --backend-store-uri <it>``)."""

    def __init__(self, out_dir: Path, hyper: dict, state: dict, enabled: bool):
        from torch.utils.tensorboard import SummaryWriter

        self.out_dir, self.enabled = out_dir, enabled
        self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=state["epoch"] + 1) if enabled else None
        self.mlflow = None
        if enabled and hyper["tracking"] == "mlflow":
            self.mlflow, state["mlflow_run"] = start_mlflow(out_dir, hyper, state.get("mlflow_run"))

    def log(self, row: dict, history: list[dict]) -> None:
        if not self.enabled:
            return
        atomic.to_csv(pd.DataFrame(history), self.out_dir / "history.tsv", sep="\t", index=False)
        epoch = row["epoch"]
        for key, value in row.items():
            if key != "epoch":
                self.writer.add_scalar(key.replace("_", "/", 1), value, epoch)
        if self.mlflow:
            client, run_id = self.mlflow
            for key, value in row.items():
                if key != "epoch":
                    client.log_metric(run_id, key, float(value), step=epoch)

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        if self.mlflow:
            client, run_id = self.mlflow
            client.set_terminated(run_id)


def start_mlflow(out_dir: Path, hyper: dict, run_id: str | None):
    """(client, run id) of this fold's MLflow run in the file store ``out_dir/mlflow``; the run of
    a resumed training continues."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        raise InputError("config `train.tracking: mlflow` needs MLflow: pip install 'mlflow-skinny' "
                         "(the `tracking` extra of this package)") from exc
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # local files, no database or server
    client = MlflowClient(tracking_uri=(out_dir / "mlflow").resolve().as_uri())
    if run_id is None:
        experiment = client.get_experiment_by_name("pipeline") or client.create_experiment("pipeline")
        experiment_id = experiment if isinstance(experiment, str) else experiment.experiment_id
        run_id = client.create_run(experiment_id, run_name=out_dir.name).info.run_id
        for key, value in flatten(hyper).items():
            client.log_param(run_id, key, value)
    return (client, run_id), run_id


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} → {"a.b": 1}."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return out
