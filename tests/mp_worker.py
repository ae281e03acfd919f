"""One process of a multi-process tiny run (driven by tests/test_multiprocess.py).

    python tests/mp_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR
"""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main(process_id: int, num_processes: int, port: int, out_dir: str) -> None:
  import jax
  import numpy as np

  from configs import default
  from mopd_jax import trainer

  c = default.get_config("tiny")
  c.eval.at_start = c.eval.at_end = False
  c.mesh.data = -1
  c.data.prompts_per_step = 4 // num_processes  # 4 prompts per step in total either way
  c.logging.dir = os.path.join(out_dir, f"log{process_id}")
  # The tiny random model's gradients are ~1e-6; with Adam's default eps the first steps are
  # sign descent, which turns reduction-order noise (4 devices vs 2 x 2) into lr-sized flips.
  # A large eps keeps the update linear in the gradient, so the comparison tests the data path.
  c.optim.eps = 1e-4
  c.optim.lr = 1e-1
  if num_processes > 1:
    c.distributed.enabled = True
    c.distributed.coordinator_address = f"127.0.0.1:{port}"
    c.distributed.num_processes = num_processes
    c.distributed.process_id = process_id
  run = trainer.setup(c)
  initial = [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(run.state.params)]
  while run.position.step < c.train.steps:
    record = trainer.run_one_step(run)
    assert record["update_applied"] == 1.0
  if jax.process_index() == 0:
    leaves = [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(run.state.params)]
    np.savez(os.path.join(out_dir, "params.npz"), *leaves)
    np.savez(os.path.join(out_dir, "initial.npz"), *initial)
  if num_processes > 1:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
