"""Fix for Snakemake's ``--group-components`` in a workflow with a checkpoint (snakemake#1628).

On a cluster, the per-image ``preprocess`` jobs (``group: "preprocess"``) are submitted in batches
of N images with ``--group-components preprocess=N``. Snakemake 9 builds a batch by merging its
groups *into the first one*, an object it also keeps in its group cache. Each later DAG update
(this workflow's ``ingest`` checkpoint causes one; a dry run of an ingested study makes two) gets
the merged batches back from that cache as if they were single images and merges N of them
again: N² images per job after two updates, and a whole study in one SLURM job after three.

:func:`fix_group_components` replaces that step by one that builds every batch as a new group
object (cached under the batch's own jobs) from the unmerged groups, in DAG job order, so that any
number of updates gives the same ``ceil(images / N)`` batches. Only ``DAG._update_group_components``
changes; grouping without ``--group-components`` is untouched.
"""

from __future__ import annotations

from collections import defaultdict

PATCHED_MAJOR = "9."  # the method replaced below is the one of Snakemake 9.x


def _update_group_components(self) -> None:
    """Span N connected components of a group per group job, the same N on every DAG update."""
    from snakemake.common import group_into_chunks

    groups_by_id = defaultdict(set)
    for group in self._group.values():
        groups_by_id[group.groupid].add(group)
    for groupid, components in groups_by_id.items():
        lookup_id = self.workflow.parent_groupids.get(groupid, groupid)
        n_components = self.workflow.group_settings.group_components.get(lookup_id, 1)
        if n_components <= 1:
            continue
        ordered = sorted(components, key=lambda group: min(self.jobid(job) for job in group.jobs))
        for chunk in group_into_chunks(n_components, ordered):
            if len(chunk) == 1:
                continue
            batch = self.group_job_factory.new(
                groupid, [job for group in chunk for job in group.jobs], self.workflow.global_resources
            )
            for job in batch.jobs:
                self._group[job] = batch
    for group in self._group.values():
        group.finalize()


def fix_group_components() -> bool:
    """Install the fix into Snakemake's DAG class; True when installed (Snakemake 9.x only)."""
    import snakemake
    from snakemake.dag import DAG

    if not snakemake.__version__.startswith(PATCHED_MAJOR):
        return False
    DAG._update_group_components = _update_group_components
    return True
