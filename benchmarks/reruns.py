"""Which rules an edit reruns: for each module, the workflow's rules whose code inputs hold it.

    python benchmarks/reruns.py [--package DIR] MODULE [MODULE ...]

A rule's code input is the fingerprint of its command's import closure (``code("<room>.<module>")``,
``pipeline.common.codegraph``), so editing a module's code (not its docstrings or comments) reruns
exactly the rules listed here. ``--package`` reads another copy of ``src/pipeline`` (e.g. an older
commit's, from ``git archive REV src | tar -x -C DIR``), with this checkout's workflow rules.
Prints one markdown row per module: the module and the rules, in the order of ``workflow/rules``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from pipeline.common import codegraph
from pipeline.common.locations import PACKAGE, WORKFLOW


def rule_commands() -> dict[str, str]:
    """{rule name: the command whose code it declares} from ``workflow/rules/*.smk``."""
    found = {}
    for smk in sorted((WORKFLOW / "rules").glob("*.smk")):
        for rule in re.split(r"\n(?=\s*(?:rule|checkpoint) \w+:)", smk.read_text()):
            name, code = re.search(r"(?:rule|checkpoint) (\w+):", rule), re.search(r'code=code\("([\w.]+)"\)', rule)
            if name and code:
                found[name.group(1)] = code.group(1)
    return found


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", type=Path, default=PACKAGE, help="the src/pipeline folder to read")
    parser.add_argument("modules", nargs="+", help="dotted names, e.g. pipeline.results.diagnostics")
    args = parser.parse_args(argv)
    rules = rule_commands()
    closures = {c: codegraph.closure(f"pipeline.{c}", package=args.package) for c in set(rules.values())}
    for module in args.modules:
        hit = [rule for rule, command in rules.items() if module in closures[command]]
        print(f"| `{module}` | {', '.join(hit) if hit else 'none'} |")


if __name__ == "__main__":
    main()
