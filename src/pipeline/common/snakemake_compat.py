"""Fix for Snakemake's ``--group-components`` in a workflow with a checkpoint (snakemake#1628),
installed only where the installed Snakemake shows the bug.

On a cluster, the per-image ``preprocess`` jobs (``group: "preprocess"``) are submitted in batches
of N images with ``--group-components preprocess=N``. Snakemake 9 (9.27.1 at least) builds a batch by
merging its groups *into the first one*, an object it also keeps in its group cache. Each later DAG
update (this workflow's ``ingest`` checkpoint causes one; a dry run of an ingested study makes two)
gets the merged batches back from that cache as if they were single images and merges N of them
again: N² images per job after two updates, and a whole study in one SLURM job after three.

:func:`has_the_bug` reproduces that in memory with Snakemake's own code: its ``DAG.update_groups``
and ``_update_group_components``, its ``GroupJobFactory`` and ``GroupJob``, on a stand-in DAG of
independent jobs of one group (``_MiniDAG``), updated twice. :func:`fix_group_components` installs
:func:`_update_group_components` only when the batches come out wrong: it builds every batch as a new
group object (cached under the batch's own jobs) from the unmerged groups, in DAG job order, so that
any number of updates gives the same ``ceil(images / N)`` batches. Only
``DAG._update_group_components`` changes; grouping without ``--group-components`` is untouched. A
Snakemake whose internals no longer fit the reproduction is left alone: the cluster dry run
(``tests/cluster/test_dry_run.py``) checks the batches a real plan gets.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace


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


def _dag_class():
    import snakemake.api  # noqa: F401  (snakemake.dag alone is a circular import)
    from snakemake.dag import DAG

    return DAG


class _Job:
    """A stand-in job of group ``g`` that depends on nothing."""

    group = "g"
    rule = SimpleNamespace(name="r")

    def __init__(self, number: int, dag):
        self.number, self.dag = number, dag


def _mini_dag(method, images: int, n: int):
    """A stand-in DAG of ``images`` independent jobs of one group with ``--group-components g=n``,
    whose group steps are Snakemake's own and whose ``_update_group_components`` is ``method``."""
    from snakemake.jobs import GroupJobFactory

    DAG = _dag_class()

    class _MiniDAG:
        update_groups = DAG.update_groups
        validate_group = DAG.validate_group
        _check_groups = DAG._check_groups
        bfs = DAG.bfs
        _update_group_components = method

        def __init__(self):
            self.workflow = SimpleNamespace(parent_groupids={}, global_resources=None,
                                            group_settings=SimpleNamespace(group_components={"g": n}),
                                            execution_settings=SimpleNamespace(attempt=1))
            self.group_job_factory = GroupJobFactory()
            self.jobs = [_Job(i, self) for i in range(images)]
            self._dependencies = {job: {} for job in self.jobs}

        def needrun_jobs(self):
            return self.jobs

        def needrun(self, job):
            return True

        def jobid(self, job):
            return job.number

        def toposorted(self, jobs, inherit_pipe_dependencies=False):
            return [sorted(jobs, key=lambda job: job.number)]

    return _MiniDAG()


def batch_sizes(method, images: int, n: int, updates: int) -> list[int]:
    """The sizes of the group jobs Snakemake's group steps, with ``method`` as
    ``_update_group_components``, give ``images`` jobs under ``--group-components g=n`` after
    ``updates`` DAG updates (largest first); right, whatever ``updates``: ``expected(images, n)``."""
    dag = _mini_dag(method, images, n)
    for _ in range(updates):
        dag.update_groups()
    return sorted((len(group.jobs) for group in set(dag._group.values())), reverse=True)


def expected(images: int, n: int) -> list[int]:
    """``ceil(images / n)`` batches: of ``n`` images each, the last of the rest."""
    return [n] * (images // n) + ([images % n] if images % n else [])


ORIGINAL = "_snakemakes_own_update_group_components"  # where the fix keeps the method it replaced


def snakemakes_method():
    """The installed Snakemake's own ``DAG._update_group_components`` (also once the fix is in)."""
    DAG = _dag_class()
    return getattr(DAG, ORIGINAL, DAG._update_group_components)


def has_the_bug() -> bool:
    """Whether Snakemake's own ``_update_group_components`` batches 8 images by 2 into anything but
    4 batches of 2 after two DAG updates (with the bug: batches of 4, some of them stale copies);
    False when its internals no longer fit the reproduction (then there is nothing here to patch
    either)."""
    try:
        sizes = batch_sizes(snakemakes_method(), images=8, n=2, updates=2)
    except (AttributeError, TypeError, KeyError, ImportError):
        return False
    return sizes != expected(8, 2)


def fix_group_components() -> bool:
    """Install the fix into Snakemake's DAG class when the installed Snakemake has the bug; True
    when it is installed (again, for a second workflow in the same process)."""
    if not has_the_bug():
        return False
    DAG = _dag_class()
    if not hasattr(DAG, ORIGINAL):
        setattr(DAG, ORIGINAL, DAG._update_group_components)
    DAG._update_group_components = _update_group_components
    return True
