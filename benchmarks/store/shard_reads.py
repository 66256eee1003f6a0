"""Which structures each rank of a DeepSpeed job reads from a store (issue 17: per-rank shards).

Run under ``torchrun --nproc_per_node=2``; it trains the given config (``training.engine:
deepspeed``, a ``store`` source, ``deepspeed.shard_data: true``) with ``StoreDataset``'s reads
recorded, then writes ``OUT/reads-rank<r>.json`` and, on rank 0, a summary: structures read per
rank, overlap between ranks, and the fraction of the training set each rank touched.

    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node=2 benchmarks/store/shard_reads.py CONFIG OUT
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from atomforge import StoreDataset, load_config, make_registry
from atomforge import distributed as dist
from atomforge.workflows.train import train


def main() -> None:
    config_path, out = Path(sys.argv[1]), Path(sys.argv[2])
    reads: dict[str, set[int]] = {}
    build, structure = StoreDataset._build, StoreDataset.structure

    def traced_build(self, k):  # noqa: ANN001, ANN202
        reads.setdefault(self.source, set()).add(int(self.indices[int(k)]))
        return build(self, k)

    def traced_structure(self, k):  # noqa: ANN001, ANN202
        reads.setdefault(self.source, set()).add(int(self.indices[int(k)]))
        return structure(self, k)

    StoreDataset._build, StoreDataset.structure = traced_build, traced_structure
    started = time.perf_counter()
    config = load_config(config_path)
    outcome = train(config, make_registry(), verbose=False)
    out.mkdir(parents=True, exist_ok=True)
    mine = {source: sorted(indices) for source, indices in reads.items()}
    (out / f"reads-rank{dist.rank()}.json").write_text(json.dumps(mine))
    dist.barrier()
    if dist.is_main():
        ranks = [json.loads((out / f"reads-rank{r}.json").read_text()) for r in range(dist.world_size())]
        summary = {"processes": dist.world_size(), "seconds": time.perf_counter() - started,
                   "epochs": outcome.epochs, "per_source": {}}
        for source in sorted({s for r in ranks for s in r}):
            sets = [set(r.get(source, [])) for r in ranks]
            union = set().union(*sets)
            summary["per_source"][source] = {
                "read_per_rank": [len(s) for s in sets], "union": len(union),
                "overlap_between_ranks": len(set.intersection(*sets)) if len(sets) > 1 else 0}
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
