#!/usr/bin/env python3
"""Fine-tune a causal LM from a plain PyTorch loop with an lr scheduler, its training state offloaded by offload.

    python3 examples/plain_loop.py                                  # a small Llama, the text shipped with offload
    python3 examples/plain_loop.py --model HF_DIR --data notes.txt --nvme-dir /nvme/swap --steps 200 --out OUT

Against the same loop with torch.optim.AdamW, the changes are the lines marked "offload:": the engine replaces
the optimizer (``engine.optimizer`` is a torch Optimizer for the scheduler), the forward goes through the engine
and the backward is ``engine.backward(loss)``. The result is the same trajectory as AdamW on one device.
"""

from __future__ import annotations

import math
import tempfile

import torch

import offload
from common import arguments, load_model, token_blocks


def main() -> None:
    ap = arguments(__doc__.splitlines()[1])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    a = ap.parse_args()

    model, tokenizer = load_model(a.model)
    blocks = token_blocks(tokenizer, a.data, a.seq_len)
    loader = torch.utils.data.DataLoader(blocks, batch_size=a.batch, shuffle=True, drop_last=True)
    nvme_dir = a.nvme_dir or tempfile.mkdtemp(prefix="offload-example-")
    config = offload.Config(params="nvme", optimizer="nvme", nvme_dir=nvme_dir)  # offload: where the state lives

    engine = offload.Engine(model, config, lr=a.lr, weight_decay=0.1, max_grad_norm=1.0)  # offload: was AdamW(...)
    optimizer = engine.optimizer                                                           # offload
    warmup = max(1, a.steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine decay to 10%
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * min(s, a.steps) / a.steps)))

    model.train()
    step = 0
    while step < a.steps:
        for batch in loader:
            loss = engine(**batch).loss  # offload: was model(**batch).loss
            engine.backward(loss)        # offload: was loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            print(f"step {step}: loss {loss.item():.4f}, lr {scheduler.get_last_lr()[0]:.2e}", flush=True)
            if step == a.steps:
                break

    if a.out:
        offload.save_pretrained(engine, a.out, tokenizer=tokenizer, overwrite=True)  # streamed from the engine
        print(f"wrote {a.out}")
    engine.close(keep_weights=False)  # removes the swap files


if __name__ == "__main__":
    main()
