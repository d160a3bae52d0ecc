"""Restart cost of the input pipeline: replaying consumed batches vs restoring the iterator state.

  python benchmarks/restart.py [--batches 1000,20000] [--json benchmarks/results/restart.json]

For each position N (batches consumed when the checkpoint was written), on the training input of
--task (batch --batch_size x --length, packed, shuffled, seed 0, one process): the time from the
start of resume to the first batch ready (a fresh start, building the pipeline without
resuming, is the floor), for (a) replaying the N consumed batches (the path of
checkpoints without iterator state) and (b) restoring the tf.data iterator state saved in an
orbax checkpoint at N (moe_jax.train.checkpoints.Checkpointer, as the trainer does). Both build
the pipeline from scratch and must yield the same first batch. Also reports the iterator
state's size on disk and the time `Checkpointer.save` spends writing it (synchronous, part of
each save). Prints a table and writes JSON; numbers are for the machine it runs on.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from moe_jax.train import checkpoints as ckpt_lib  # noqa: E402
from moe_jax.train import loop  # noqa: E402
from moe_jax.train.steps import TrainState  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "restart.json"))
  parser.add_argument("--task", default="tiny_shakespeare_lm")
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--length", type=int, default=128)
  parser.add_argument("--batches", default="1000,20000",
                      help="comma-separated positions N (batches consumed) to restart from")
  args = parser.parse_args()
  positions = sorted(int(n) for n in args.batches.split(","))

  def batches(skip=0):
    return loop.input_batches(args.task, {"targets": args.length}, "train", args.batch_size,
                              shuffle=True, seed=0, num_epochs=None, skip_batches=skip)

  state = TrainState(jnp.zeros((), jnp.int32), {"w": jnp.zeros(1)}, {})
  rows = []
  with tempfile.TemporaryDirectory() as model_dir:
    # One pass writes a checkpoint at every position (the run being restarted).
    checkpointer = ckpt_lib.Checkpointer(model_dir, max_to_keep=None, async_save=False)
    run, drawn = batches(), 0
    save_s = {}
    for n in positions:
      for _ in range(n - drawn):
        next(run)
      drawn = n
      start = time.perf_counter()
      checkpointer.save(n, state, batches_consumed=n, input_iterator=run)
      save_s[n] = time.perf_counter() - start
    checkpointer.close()

    start = time.perf_counter()
    next(batches())
    fresh_s = time.perf_counter() - start  # building the pipeline: part of both paths

    for n in positions:
      checkpointer = ckpt_lib.Checkpointer(model_dir)
      start = time.perf_counter()
      restored = batches()
      assert checkpointer.restore_input_iterator(n, restored)
      first_restored = next(restored)
      restore_s = time.perf_counter() - start
      checkpointer.close()

      start = time.perf_counter()
      first_replayed = next(batches(skip=n))
      replay_s = time.perf_counter() - start
      same = all(np.array_equal(first_restored[k], first_replayed[k]) for k in first_replayed)
      item = os.path.join(model_dir, ckpt_lib.CHECKPOINT_SUBDIR, str(n),
                          ckpt_lib.INPUT_ITERATOR_ITEM)
      size = sum(os.path.getsize(os.path.join(item, f)) for f in os.listdir(item))
      rows.append({"batches": n, "fresh_start_s": fresh_s, "replay_s": replay_s,
                   "restore_s": restore_s,
                   "speedup": replay_s / restore_s, "state_bytes": size,
                   "save_s": save_s[n], "same_first_batch": bool(same)})

  print(f"{args.task}, batch {args.batch_size} x {args.length}, 1 process "
        f"({os.cpu_count()} CPUs): resume to first batch ready")
  print("| batches consumed | fresh start (s) | replay (s) | restore state (s) | speed-up "
        "| state size (MB) | save (s) | same batch |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['batches']} | {r['fresh_start_s']:.2f} | {r['replay_s']:.2f} | "
          f"{r['restore_s']:.2f} | "
          f"{r['speedup']:.0f}x | {r['state_bytes'] / 1e6:.2f} | {r['save_s']:.2f} | "
          f"{r['same_first_batch']} |")
  os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
  with open(args.json, "w") as f:
    json.dump({"task": args.task, "batch_size": args.batch_size, "length": args.length,
               "platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
               "results": rows}, f, indent=1)
  print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
