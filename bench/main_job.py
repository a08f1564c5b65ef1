"""The main job's wall time from a fresh clone: ``python -m dress_lightning fit -c configs/crl.yaml``.

Clones this checkout's HEAD into a temporary directory (nothing built: no shards, no tower, no models), runs the
main job there with this environment's Python, samples its process tree's RSS every 50 ms, and reads each
stage's time from the stage graph's log lines ("Stage NAME done in N s"). Stages nest (the SFT stage builds the
warm-up it starts from), so a stage's own time is its logged time less the stages it ran inside it. ``speedup`` = the 5-minute target / the wall time (>= 1: met).

    flock /tmp/dress-cpu.lock python bench/main_job.py --json bench/results/main_job.json
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, print_table, run_sampled, write_json

TARGET_S = 300.0
STAGE_EVENT = re.compile(r"Stage (\S+)(?::.*? is missing; running| done in (\d+) s)")


def own_times(log: str, wall: float) -> dict[str, float]:
    """Each stage's own seconds from the log; the wall time left over is the job's own stage.

    A stage logs when it starts ("... is missing; running ... first") and when it is done, with its seconds. A stage
    that starts while another runs is nested in it (the SFT stage builds the warm-up it starts from), so a stage's
    own time is its logged time less its children's.
    """
    own: dict[str, float] = {}
    stack: list[str] = []
    children: dict[str, float] = {}
    for name, done in STAGE_EVENT.findall(log):
        if not done:
            stack.append(name)
            continue
        stack.pop()
        own[name] = float(done) - children.pop(name, 0.0)
        parent = stack[-1] if stack else None
        children[parent] = children.get(parent, 0.0) + float(done)
    own["main job's own stage (CRL)"] = wall - children.get(None, 0.0)
    return own


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/crl.yaml")
    parser.add_argument("--keep", help="clone into this directory and keep it (default: a temporary one)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dress-main-job-") as tmp:
        clone = Path(args.keep or Path(tmp) / "clone")
        subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
        run = run_sampled([sys.executable, "-m", "dress_lightning", "fit", "-c", args.config], cwd=str(clone),
                          env={**os.environ, "PYTHONPATH": str(clone / "src")})
        log = run.pop("output")
    stages = own_times(log, run["wall_s"])
    print_table(["stage", "s"], [*stages.items(), ["total (wall)", run["wall_s"]]])
    print(f"peak RSS of the process tree {run['tree_peak_rss_mib']:.0f} MiB; "
          f"{run['wall_s'] / 60:.1f} min against the {TARGET_S / 60:.0f}-minute target")
    write_json(args.json, {
        "speedup": TARGET_S / run["wall_s"],
        "speedup_is": "the 5-minute target / the main job's wall time from a fresh clone (>= 1: met)",
        "met": run["wall_s"] <= TARGET_S,
        "wall_s": run["wall_s"],
        "stage_s": stages,
        "stage_log": [line for line in log.splitlines() if "Stage " in line],
        "peak_rss_mib": {k: v for k, v in run.items() if k.endswith("_mib")},
        "settings": vars(args),
    })


if __name__ == "__main__":
    main()
