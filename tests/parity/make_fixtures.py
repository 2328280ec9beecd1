"""Builds the reference fixtures that the Rust parity tests compare against.

Runs every `fixtures_*.py` module beside this file; each exposes `main(out_dir)` and writes under
`out_dir/<area>/`. The reference packages (torch, diffusers, peft, transformers, open_clip_torch,
pytorch-fid, Pillow) are test oracles only: nothing of this runs in the shipped tool.
A module is skipped when its stamp (a hash of its source and of the files it names on
`# depends: <path from the repository root>` lines) matches, so reruns are cheap.
"""
import argparse
import hashlib
import importlib.util
import pathlib
import sys


def stamp_of(script: pathlib.Path, repo: pathlib.Path) -> str:
    """A hash of the script and of the files its `# depends:` lines name (e.g. the example
    reward scripts a fixture module exports)."""
    source = script.read_bytes()
    h = hashlib.blake2b(source, digest_size=16)
    for line in source.decode("utf-8").splitlines():
        if line.startswith("# depends: "):
            h.update((repo / line.removeprefix("# depends: ").strip()).read_bytes())
    return h.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, type=pathlib.Path)
    parser.add_argument("--force", action="store_true", help="rebuild even when the stamp matches")
    args = parser.parse_args()
    here = pathlib.Path(__file__).resolve().parent
    for script in sorted(here.glob("fixtures_*.py")):
        area = script.stem.removeprefix("fixtures_")
        area_dir = args.out / area
        stamp = area_dir / ".stamp"
        digest = stamp_of(script, here.parents[1])
        if not args.force and stamp.exists() and stamp.read_text() == digest:
            print(f"fixtures {area}: up to date")
            continue
        area_dir.mkdir(parents=True, exist_ok=True)
        spec = importlib.util.spec_from_file_location(script.stem, script)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(here))
        spec.loader.exec_module(module)
        print(f"fixtures {area}: building in {area_dir}", flush=True)
        module.main(area_dir)
        stamp.write_text(digest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
