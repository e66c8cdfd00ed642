"""Run every benchmark script in this folder, one after the other, and print one summary table.

Run by hand: `.venv/bin/python benchmarks/run_all.py [--only NAME ...] [--timeout-s 1800] [--log DIR]`.

Each `bench_*.py` runs in its own process (so one benchmark's memory peak or thread pool does not skew
the next) with its default options; its full output goes to `DIR/<name>.log` (default: a temporary
folder, printed at the end) and the table shows the exit code, the wall time and the output's last
lines, where every benchmark prints its ratios against its naive baseline.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these (e.g. bench_session)")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="per benchmark")
    parser.add_argument("--tail", type=int, default=4, help="output lines to show per benchmark")
    parser.add_argument("--log", type=Path, help="folder for the full outputs")
    args = parser.parse_args()
    scripts = sorted(p for p in HERE.glob("bench_*.py"))
    if args.only:
        wanted = {name.removesuffix(".py") for name in args.only}
        scripts = [p for p in scripts if p.stem in wanted]
        if not scripts:
            print(f"no benchmark called {sorted(wanted)} in {HERE}", file=sys.stderr)
            return 2
    log_dir = args.log or Path(tempfile.mkdtemp(prefix="benchmarks-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    from rich.console import Console
    from rich.table import Table

    table = Table(title="benchmarks")
    for column in ("benchmark", "exit", "wall s", "last lines of output"):
        table.add_column(column)
    failed = 0
    for script in scripts:
        print(f"running {script.name} ...", flush=True)
        start = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=HERE.parent,
                                  timeout=args.timeout_s, check=False)
            code, output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as exc:
            code = -1
            output = f"{exc.stdout or ''}\ntimed out after {args.timeout_s:.0f} s"
        wall_s = time.perf_counter() - start
        (log_dir / f"{script.stem}.log").write_text(output if isinstance(output, str) else output.decode())
        lines = [line for line in str(output).splitlines() if line.strip()]
        failed += code != 0
        table.add_row(script.stem, str(code), f"{wall_s:.0f}", "\n".join(lines[-args.tail:]))
    Console(width=200).print(table)
    print(f"full outputs in {log_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
