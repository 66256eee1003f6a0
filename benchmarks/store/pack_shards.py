"""Pack extxyz shards into one store through the Python API, one file after another (the
sequential baseline of ``atomforge data pack``), reporting structures/s, bytes per structure and
peak memory. Resumable: a file already packed is skipped, a half-packed one continues.

    python benchmarks/store/pack_shards.py OUT.store DIR/shard-*.extxyz
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import ase.io

from atomforge import StoreWriter
from atomforge.data.store import pack_structures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("files", nargs="+")
    parser.add_argument("--compress", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    with StoreWriter(args.out, compress=args.compress) as writer:
        before = len(writer)
        for name in args.files:
            source_id = str(Path(name).resolve())
            entry = writer.meta["sources"].get(source_id, {})
            if entry.get("complete"):
                continue
            pack_structures(writer, ase.io.iread(name, index=":"), source_id=source_id, spec=name,
                            skip=int(entry.get("done", 0)), commit_every=5000, where=name)
            print(f"{name}: store holds {len(writer)} structures, {time.perf_counter() - started:.0f} s", flush=True)
        packed = len(writer) - before
        total_bytes = sum(p.stat().st_size for p in Path(args.out).iterdir())
    elapsed = time.perf_counter() - started
    print(json.dumps({"structures": len(writer), "packed_now": packed, "seconds": elapsed,
                      "structures_per_s": packed / max(elapsed, 1e-9), "bytes_on_disk": total_bytes,
                      "bytes_per_structure": total_bytes / max(len(writer), 1), "compress": args.compress,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    main()
