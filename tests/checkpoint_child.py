"""Trains the checkpoint tests' MLP and saves after every step until killed (see test_checkpoint_kill.py).

Usage: python checkpoint_child.py CKPT_DIR SWAP_DIR STEPS PLACEMENT. Prints "saving K" before and "saved K"
after each save, flushed, so the parent can time its kill -9 into a save.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import offload  # noqa: E402
from engine_reference import batches, loss_of, mlp, no_decay_groups  # noqa: E402

LR = 3e-3


def make_engine(swap_dir: str, placement: str, seed: int = 0) -> offload.Engine:
    params, optimizer = placement.split("/")
    model = mlp(seed=seed)
    config = offload.Config(device="cpu", dtype="fp32", params=params, optimizer=optimizer, nvme_dir=swap_dir)
    return offload.Engine(model, config, lr=LR, weight_decay=0.1, max_grad_norm=0.5,
                          param_groups=no_decay_groups(model))


def train_step(engine: offload.Engine, step: list[dict]) -> None:
    for batch in step:
        engine.backward(loss_of("mlp", engine, batch))
    engine.step()


def main() -> None:
    ckpt, swap_dir, steps, placement = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    data = batches("mlp", steps, micro=1)
    engine = make_engine(swap_dir, placement)
    for k, step in enumerate(data, start=1):
        train_step(engine, step)
        print(f"saving {k}", flush=True)
        engine.save(ckpt, extra={"step": k})
        print(f"saved {k}", flush=True)
    engine.close()


if __name__ == "__main__":
    main()
