"""Where a training run's metrics go: history.tsv, TensorBoard and, when asked, MLflow.

MLflow (``train.tracking: mlflow``): the server or store named by ``$MLFLOW_TRACKING_URI`` when it
is set, else one file store per study (the workflow passes ``results/mlflow``); in it one
experiment per study (the workflow names it after the study's results folder) holding one run per
fold and variant (``fold-1``, ``fold-1/variant-small``, tagged ``fold`` and ``variant``), so one
``mlflow ui --backend-store-uri results/mlflow`` compares them all.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.common import atomic
from pipeline.common.errors import InputError
from pipeline.learning.settings import TrainSettings


@dataclass(frozen=True)
class MlflowTarget:
    """Where one training run goes in MLflow: the file store (used unless $MLFLOW_TRACKING_URI is
    set), the experiment (one per study) and this run's name (``fold-K`` or ``fold-K/variant-NAME``)."""

    store: Path
    experiment: str
    run: str

    @classmethod
    def alone(cls, out_dir: Path) -> "MlflowTarget":
        """A run on its own: a store in ``out_dir/mlflow``, experiment ``pipeline``, the folder's name."""
        return cls(out_dir / "mlflow", "pipeline", out_dir.name)


class Trackers:
    """Metrics per epoch: ``history.tsv`` and TensorBoard always, MLflow with ``tracking: mlflow``
    (``mlflow``: where the run goes; default ``MlflowTarget.alone(out_dir)``)."""

    def __init__(self, out_dir: Path, settings: TrainSettings, state: dict, enabled: bool,
                 mlflow: MlflowTarget | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.out_dir, self.enabled = out_dir, enabled
        self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=state["epoch"] + 1) if enabled else None
        self.mlflow = None
        if enabled and settings.tracking == "mlflow":
            target = mlflow or MlflowTarget.alone(out_dir)
            self.mlflow, state["mlflow_run"] = start_mlflow(target, settings, state.get("mlflow_run"))

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


def start_mlflow(target: MlflowTarget, settings: TrainSettings, run_id: str | None):
    """(client, run id) of this run in ``$MLFLOW_TRACKING_URI`` or else the file store ``target.store``;
    the run of a resumed training continues."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        raise InputError("config `train.tracking: mlflow` needs MLflow: pip install 'mlflow-skinny' "
                         "(the `tracking` extra of this package)") from exc
    store = None if os.environ.get("MLFLOW_TRACKING_URI") else target.store  # MLflow reads the variable itself
    if store:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # local files, no database or server
        store.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=store.resolve().as_uri() if store else None)
    if run_id is None:
        experiment_id = experiment(client, target.experiment, store)
        fold, _, variant = target.run.partition("/")
        tags = {"fold": fold, **({"variant": variant.removeprefix("variant-")} if variant else {})}
        run_id = client.create_run(experiment_id, run_name=target.run, tags=tags).info.run_id
        for key, value in flatten(settings.asdict()).items():
            client.log_param(run_id, key, value)
    return (client, run_id), run_id


def experiment(client, name: str, store: Path | None) -> str:
    """The id of experiment ``name``, created if absent. In a file store (``store``) the training jobs
    of a study's folds start at once: a lock file makes one of them create it (MLflow's file store
    would create one per job); a server refuses the second creation, and the name is looked up again."""
    from mlflow.exceptions import MlflowException

    with lock(store / ".create-experiment.lock") if store else contextlib.nullcontext():
        found = client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return client.create_experiment(name)
        except MlflowException:
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id


@contextlib.contextmanager
def lock(path: Path):
    """An exclusive ``flock`` on ``path`` (created if absent) while the block runs."""
    import fcntl

    handle = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)  # a lock, never written to
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # releases the lock


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} → {"a.b": 1}."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return out
