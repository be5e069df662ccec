"""Host syncs per forward of every method, on the tiny random backbone at 2 and 32 decoder layers.

Each method (and its oracle, ``NAME:task_id``) trains two tasks through ``ContinualMLLM.forward_batch``
with four adapted modules per decoder layer, then generates with a KV cache
(``mllm_cl.system.host_syncs.method_syncs``). Per method, one row per forward kind:

- ``train:PHASE``: one training forward of the last task's phase (routing context, forward, loss,
  the method's extra loss);
- ``step:PHASE``: the gradient hooks between its backward and the optimizer step;
- ``context``: the evaluation routing context of a batch (once per batch, before the prefill);
- ``prefill`` / ``decode``: one forward of the generation's prefill, one decoding step.

A count that grows with the layers is a host round trip per layer (or per adapted module). The
width does not change the counts, so the tiny width serves for a 32-layer model.

    python benchmarks/host_syncs.py [--layers 2 32] [--methods lora_ft cmoe ...] [--sites]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mllm_cl.system.host_syncs import METHODS, method_syncs  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 32], help="decoder layer counts")
    ap.add_argument("--methods", nargs="+", default=METHODS, help=f"among {', '.join(METHODS)}")
    ap.add_argument("--sites", action="store_true", help="the call sites at the largest layer count")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    layers = sorted(args.layers)
    head = f"{'method':16s} {'forward':14s}" + "".join(f"{f'{n} layers':>11s}" for n in layers) + "  kinds at " \
        f"{layers[-1]} layers"
    print(head)
    print("-" * len(head))
    for name in args.methods:
        runs = {n: method_syncs(name, n) for n in layers}
        for key in runs[layers[-1]]:
            last = runs[layers[-1]][key]
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(last.kinds.items())) or "-"
            print(f"{name:16s} {key:14s}" + "".join(f"{runs[n][key].total:11d}" for n in layers) + f"  {kinds}")
            if args.sites:
                for line in last.lines():
                    print(f"{'':33s}{line}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
