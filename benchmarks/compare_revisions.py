"""Step time of two revisions of hf-msam, interleaved: `benchmarks/step_time.py` run from a git worktree of each
revision in turn (A B A B ...), every row's median kept per run, and the best over the rounds compared.

    python benchmarks/compare_revisions.py --base 5864615 --rounds 2 -- --hidden-size 128 --seq-len 64 --layers 2

Prints a JSON object and a table: per row, the base's and the head's best median step time and their ratio; a row
more than --tolerance (default 5%) slower on the head is marked. Arguments after `--` go to step_time.py (with
--json added). The worktree of the base is made under a temporary folder and removed afterwards; the head is the
working tree this script runs from, as it is (uncommitted changes included).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_step_time(tree: Path, args: list[str]) -> dict[str, float]:
    """One run of the step_time.py of `tree`, importing that tree's hf_msam; {row: median step time in ms}."""
    with tempfile.TemporaryDirectory() as out:
        path = Path(out) / "result.json"
        cmd = [sys.executable, str(tree / "benchmarks" / "step_time.py"), *args, "--json", str(path)]
        subprocess.run(cmd, cwd=tree, check=True, env={**os.environ, "PYTHONPATH": str(tree)}, stdout=subprocess.DEVNULL)
        result = json.loads(path.read_text())
    return {row["key"]: 1000 * row["median_s"] for row in result["rows"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the revision to compare against (a commit, a tag)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tolerance", type=float, default=0.05)
    parser.add_argument("--json", help="also write the JSON result to this path")
    split = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
    own, rest = sys.argv[1:split], sys.argv[split + 1 :]
    args = parser.parse_args(own)
    with tempfile.TemporaryDirectory() as tmp:
        base_tree = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base_tree), args.base], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        try:
            runs: dict[str, list[dict[str, float]]] = {"base": [], "head": []}
            for _ in range(args.rounds):
                for name, tree in (("base", base_tree), ("head", ROOT)):
                    runs[name].append(run_step_time(tree, rest))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT, check=False)
    keys = [k for k in runs["head"][0] if all(k in r for r in runs["base"] + runs["head"])]
    table = {}
    for key in keys:
        base = min(r[key] for r in runs["base"])
        head = min(r[key] for r in runs["head"])
        table[key] = {"base_ms": base, "head_ms": head, "ratio": head / base, "slower": head / base > 1 + args.tolerance}
    result = {"base": args.base, "rounds": args.rounds, "step_time_args": rest, "rows": table}
    print(json.dumps(result, indent=1))
    print(f"\n{'row':<28}{'base ms':>10}{'head ms':>10}{'ratio':>8}")
    for key, row in table.items():
        mark = "  <- slower" if row["slower"] else ""
        print(f"{key:<28}{row['base_ms']:>10.1f}{row['head_ms']:>10.1f}{row['ratio']:>8.3f}{mark}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
