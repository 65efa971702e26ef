"""Measure the reliability figures and write them into README.md.

Runs the kill-point sweeps of every sink, the hostile-input corpus, the fault
injection tests and the fuzz targets (counting what they did), plus the external
mutation sweep, then replaces the README section between the reliability markers.

usage: python scripts/reliability_report.py [--fuzz-examples 1000] [--sweep-cases 100]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- reliability:start -->", "<!-- reliability:end -->"


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fuzz-examples", type=int, default=1000)
    ap.add_argument("--sweep-cases", type=int, default=100)
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        env = {**os.environ, "SHARDCONV_KILL_LOG": str(t / "kills"), "SHARDCONV_CORPUS_LOG": str(t / "corpus"),
               "SHARDCONV_CASE_LOG": str(t / "cases"),
               "SHARDCONV_FUZZ_COUNTS": str(t / "fuzz"), "SHARDCONV_FUZZ_EXAMPLES": str(args.fuzz_examples)}
        tests = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py"))
        junit = t / "junit.xml"
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                            "-k", "sigkill or kill or hostile or crafted or mutated or fault or fsync or "
                                  "read_error or write_error or file_size or fuzz or random_bytes or mutations "
                                  "or wire or npy_header or entries or lock or writer or stale or planted or race "
                                  "or input_changed or over_around or link_at or corrupt or fails or failing "
                                  "or attaching or worker or share or coordinator",
                            *tests], cwd=ROOT, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stdout[-3000:], r.stderr[-2000:], file=sys.stderr)
            print("reliability tests failed; README not updated", file=sys.stderr)
            return 1
        suites = ET.parse(junit).getroot()
        by_file: collections.Counter = collections.Counter()
        for case in suites.iter("testcase"):
            m = re.search(r"(test_\w+)", case.get("classname", ""))
            if m and not any(child.tag in ("failure", "error", "skipped") for child in case):
                by_file[m.group(1)] += 1
        kill_lines = [line.split("\t") for line in _lines(t / "kills")]
        kills = collections.Counter(sink for sink, _ in kill_lines)
        timed = collections.Counter(sink for sink, point in kill_lines if point.startswith("time:"))
        corpus = collections.Counter(_lines(t / "corpus"))
        fuzz = collections.Counter(_lines(t / "fuzz"))
        cases = _cases(_lines(t / "cases"))
        sweep_json = t / "sweep.json"
        s = subprocess.run([sys.executable, str(ROOT / "bench" / "mutation_sweep.py"), "--cases", str(args.sweep_cases),
                            "--json", str(sweep_json)], cwd=ROOT, capture_output=True, text=True)
        if sweep_json.exists():
            sweep = json.loads(sweep_json.read_text())
        else:
            why = (s.stderr.strip().splitlines() or [f"exit {s.returncode}"])[-1]
            sweep = {"outcomes": {}, "failures": [f"did not run: {why}"]}
    rows = [
        "| what | figure | where |",
        "| --- | --- | --- |",
        *[f"| SIGKILL points survived, {sink} sink (output identical after resume) | {n} ({n - timed[sink]} at "
          f"code points, {timed[sink]} at times spread over the run) | shared sink suite |"
          for sink, n in sorted(kills.items())],
        f"| hostile-input cases (mutated TF checkpoints; crafted TF indexes, npz files and split-npz indexes; safetensors headers; Orbax/OCDBT, Zarr and t5x directories) | "
        f"{sum(corpus.values())}: {', '.join(f'{v} {k}' for k, v in sorted(corpus.items()))} | tests/test_hostile.py, tests/test_safetensors.py |",
        *_case_rows(cases),
        f"| fault-injection tests (disk full, ENOSPC/EIO writes, failed fsync, read error) | "
        f"{by_file.get('test_faults', 0)} passed | tests/test_faults.py |",
        f"| fuzz executions (TF index, entries, protobuf wire, npy header, npz, msgpack, safetensors header) | {sum(fuzz.values())} "
        f"over {len(fuzz)} targets, no failure | tests/test_fuzz.py, tests/test_safetensors.py |",
        f"| mutated copies of a real TF checkpoint, separate processes, --max-memory {sweep.get('max_memory', '?')} | "
        f"{sweep.get('cases', 0)}: {', '.join(f'{v} {k}' for k, v in sorted(sweep['outcomes'].items()))}; "
        f"{len(sweep['failures'])} failures; peak RSS {sweep.get('peak_rss_mib', '?')} MiB | bench/mutation_sweep.py |",
    ]
    section = "\n".join([START, "", *rows, "",
                         f"_Generated by `python scripts/reliability_report.py --fuzz-examples {args.fuzz_examples} "
                         f"--sweep-cases {args.sweep_cases}`._", "", END])
    text = args.readme.read_text()
    if START in text:
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n## Reliability\n\n" + section + "\n"
    args.readme.write_text(text)
    print(section)
    return 0


#: Case kinds logged by the shared suites (shardconv.testing.caselog), as README rows.
CASE_ROWS = [
    ("planted-link", "planted symbolic links (at DEST.partial, its lock, DEST), target untouched, per sink",
     "shared sink suite"),
    ("race", "races: DEST published by another writer after the check (after the lock, before the rename), "
             "never replaced without --overwrite, per sink", "shared sink suite"),
    ("input-overlap", "output over, around or inside the input refused, input untouched, per sink",
     "shared sink suite"),
    ("source-changed-during-run", "input rewritten during the run (same size and mtime): error, nothing at DEST, "
                                  "per source format", "shared source suite"),
    ("source-changed-between-kill-and-resume", "input rewritten between a kill and the resume: resume refused "
                                               "naming the file, per source format", "shared source suite"),
    ("corrupt-byte", "one flipped byte of stored tensor data: ChecksumError from reading and from convert, "
                     "nothing at DEST, per source format that stores checksums", "shared source suite"),
    ("corrupt-partial", "a chunk of the partial output damaged between kill and resume: detected and redone, "
                        "output identical, per sink", "shared sink suite"),
    ("fault-fsync", "os.fsync failing on the output: one line, nothing at DEST, the partial discarded, per sink",
     "shared sink suite"),
    ("fault-rename", "os.replace/os.rename failing at publish: one line, nothing at DEST, per sink",
     "shared sink suite"),
]


def _cases(lines: list[str]) -> dict[str, collections.Counter]:
    out: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in lines:
        kind, _, label = line.partition("\t")
        out[kind][label] += 1
    return out


def _case_rows(cases: dict[str, collections.Counter]) -> list[str]:
    rows = []
    for kind, what, where in CASE_ROWS:
        c = cases.get(kind, collections.Counter())
        detail = ", ".join(f"{label} {n}" for label, n in sorted(c.items()))
        rows.append(f"| {what} | {sum(c.values())}, nothing lost, no wrong output ({detail or 'none ran'}) | {where} |")
    return rows


if __name__ == "__main__":
    sys.exit(main())
