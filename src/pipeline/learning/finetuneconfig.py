"""The fine-tuning keys' check across the config (``bids-deepstudy check``, the workflow's start),
without torch: ``train.freeze`` and ``train.backbone_lr_factor`` need ``train.init_from``."""

from __future__ import annotations


def problems(config: dict) -> list[str]:
    """Fine-tuning keys set without ``train.init_from`` (the config filled in with the schema's
    defaults; each variant too): they would be ignored, or fail in every training job."""
    from pipeline.learning.variants import hyperparameters

    train, found = config["train"], []
    for variant in [None, *train["variants"]]:
        hyper, where = hyperparameters(train, variant), "`train`" if variant is None else f"`train.variants.{variant}`"
        if hyper["init_from"]:
            continue
        if hyper["backbone_lr_factor"] != 1:
            found.append(f"config {where} sets backbone_lr_factor {hyper['backbone_lr_factor']}, which slows a package's "
                         "pre-trained layers, but `train.init_from` is null: set init_from, or the factor to 1.")
        if hyper["freeze"]:
            found.append(f"config {where} sets freeze {hyper['freeze']!r}, which freezes a package's pre-trained layers, "
                         "but `train.init_from` is null: set init_from, or freeze to false.")
    return found
