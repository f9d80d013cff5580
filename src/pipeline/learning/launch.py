"""How a training job starts: one process, or one per GPU under ``torchrun`` (config ``train.gpus``).

Standard library only: the Snakefile reads it to build the train rule's command and resources.
With ``train.gpus: N > 1`` the rule runs ``python -m torch.distributed.run --standalone
--nproc_per_node N -m pipeline.learning.train …`` (``torchrun``, with the job's own Python) and requests N
GPUs (the ``gpu`` resource a cluster profile turns into ``--gpus``); each process trains on 1/N of
every batch (DistributedDataParallel, ``pipeline.learning.process``).

>>> launcher(1), launcher(2)
('python', 'python -m torch.distributed.run --standalone --nproc_per_node 2')
"""

from __future__ import annotations

from pipeline.learning.variants import hyperparameters


def processes(train: dict, variant: str | None = None) -> int:
    """Processes (= GPUs) of one training job: config ``train.gpus``, a variant's own when it sets one."""
    return int(hyperparameters(train, variant)["gpus"])


def launcher(n: int) -> str:
    """What starts ``-m pipeline.learning.train``: Python itself, or ``torchrun`` with ``n`` processes."""
    return "python" if n == 1 else f"python -m torch.distributed.run --standalone --nproc_per_node {n}"


def gpus_requested(config: dict, variant: str | None = None) -> int:
    """The ``gpu`` resource of one training job: ``train.gpus`` when above 1, else 1 with config
    ``gpu: true`` and 0 without."""
    n = processes(config["train"], variant)
    return n if n > 1 else int(bool(config["gpu"]))


def problems(config: dict) -> list[str]:
    """Problems of ``device`` and ``train.gpus`` together (the config filled in with the schema's defaults)."""
    train, found = config["train"], []
    for variant in [None, *train["variants"]]:
        n, where = processes(train, variant), "`train.gpus`" if variant is None else f"`train.variants.{variant}`"
        if n == 1:
            continue
        if config["device"] == "cpu":
            found.append(f"config {where} asks for {n} GPUs, but `device` is 'cpu'. Set `device: auto` "
                         "(or cuda), or `train.gpus: 1`.")
        batch = hyperparameters(train, variant)["batch_size"]
        if batch % n:
            found.append(f"config `train.batch_size` ({batch}) does not divide among {where}'s {n} processes: "
                         f"every batch would lose {batch % n} image(s). Set a multiple of {n}.")
    return found
