"""One process of a multi-process tiny run (driven by tests/test_multiprocess.py).

    python tests/mp_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR [MESH] [MODE]

MESH: "data,fsdp,tensor" (default "-1,1,1"). MODE: "train" (default: 3 trainer steps, then
process 0 saves the params), "train:TEACHER_MODE[:STEPS]" (the same with teacher.mode = ema,
trust_region, frozen or external, and that many steps), "sample" (each process samples its share of 8 prompts over
the mesh from the sharded model, greedy and at temperature 1, and saves its rows) or "ckpt:STEPS" (resume from
OUT_DIR/ck if it holds a step, train to STEPS saving every step, each process writes the step it resumed from).
"""

import os
import sys

NUM_PROMPTS = 8


def _config(process_id: int, num_processes: int, port: int, out_dir: str, mesh: str):
  from configs import default

  c = default.get_config("tiny")
  c.eval.at_start = c.eval.at_end = False
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = (int(x) for x in mesh.split(","))
  c.data.prompts_per_step = 4  # for the whole run: each of the processes samples its share
  c.logging.dir = os.path.join(out_dir, f"log{process_id}")
  # The tiny random model's gradients are ~1e-6; with Adam's default eps the first steps are
  # sign descent, which turns reduction-order noise (4 devices vs 2 x 2) into lr-sized flips.
  # A large eps keeps the update linear in the gradient, so the comparison tests the data path.
  c.optim.eps = 1e-4
  # lr 3e-2, not 1e-1: at 1e-1 the frozen teacher's run met a near-tie in the student's top-100
  # set at step 3, and 2 processes (gloo's reduction order, ~1e-9) landed on its other side from
  # 1 process whatever the mesh, data parallel included (params 7e-9 apart after step 2, 1.3e-4
  # after step 3): a discontinuity of the loss, not of the sharding this compares.
  c.optim.lr = 3e-2
  if num_processes > 1:
    c.distributed.enabled = True
    c.distributed.coordinator_address = f"127.0.0.1:{port}"
    c.distributed.num_processes = num_processes
    c.distributed.process_id = process_id
  return c


def _local_leaves(tree):
  """Every leaf in full on this host (gathered when sharded across processes)."""
  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  return [np.asarray(multihost_utils.process_allgather(x, tiled=True)) if not x.is_fully_addressable
          else np.asarray(x) for x in jax.tree.leaves(tree)]


def train(run, c, out_dir: str) -> None:
  import jax
  import numpy as np

  from mopd_jax import trainer

  initial = _local_leaves(run.state.params)
  while run.position.step < c.train.steps:
    record = trainer.run_one_step(run)
    assert record["update_applied"] == 1.0
  leaves = _local_leaves(run.state.params)
  if jax.process_index() == 0:
    np.savez(os.path.join(out_dir, "params.npz"), *leaves)
    np.savez(os.path.join(out_dir, "initial.npz"), *initial)


def sample(run, out_dir: str) -> None:
  import jax
  import numpy as np

  from mopd_jax import sampling

  share = NUM_PROMPTS // jax.process_count()
  first = jax.process_index() * share
  prompts = [[1 + (7 * p + 3 * i) % 60 for i in range(3 + p % 5)] for p in range(first, first + share)]
  for name, temperature in (("greedy", 0.0), ("sampled", 1.0)):
    params = sampling.SamplingParams(temperature=temperature, max_new_tokens=12, prompt_buckets=(8, 16),
                                     generation_buckets=(16,), stop_token_ids=(5,))
    result = sampling.sample((run.sampler_graphdef, run.sampler_params()), prompts, num_samples=2,
                             rng=jax.random.key(7), sampling_params=params, mesh=run.sample_mesh,
                             prompt_ids=list(range(first, first + share)))
    np.savez(os.path.join(out_dir, f"{name}{jax.process_index()}.npz"), tokens=result.tokens,
             logprobs=result.logprobs, lengths=result.lengths)


def checkpoint_run(c, out_dir: str, steps: int) -> None:
  import jax

  from mopd_jax import trainer

  c.checkpoint.dir, c.checkpoint.every, c.train.steps = os.path.join(out_dir, "ck"), 1, steps
  run = trainer.setup(c)  # restores (verifying checksums, falling back past a damaged step)
  with open(os.path.join(out_dir, f"resumed{jax.process_index()}.txt"), "w") as f:
    f.write(str(run.position.step))
  while run.position.step < steps:
    trainer.run_one_step(run)
    run.checkpointer.save(run.position.step, run.checkpoint_arrays(), run.position)
  run.checkpointer.close()


def main(process_id: int, num_processes: int, port: int, out_dir: str, mesh: str = "-1,1,1",
         mode: str = "train") -> None:
  import jax

  from mopd_jax import trainer

  c = _config(process_id, num_processes, port, out_dir, mesh)
  if mode.startswith("ckpt:"):
    checkpoint_run(c, out_dir, int(mode.split(":")[1]))
    if num_processes > 1:
      jax.distributed.shutdown()
    return
  if mode.startswith("train:"):
    _, c.teacher.mode, *steps = mode.split(":")
    c.train.steps = int(steps[0]) if steps else c.train.steps
    if c.teacher.mode == "external":
      c.teacher.external_preset = "tiny-llama"  # another random tiny model (seeded: the same everywhere)
  run = trainer.setup(c)
  if mode.startswith("train"):
    train(run, c, out_dir)
  else:
    sample(run, out_dir)
  if num_processes > 1:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], *sys.argv[5:])
