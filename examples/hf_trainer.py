#!/usr/bin/env python3
"""Fine-tune a causal LM with the Hugging Face Trainer, its training state offloaded by offload.

    python3 examples/hf_trainer.py                                  # a small Llama, the text shipped with offload
    python3 examples/hf_trainer.py --model HF_DIR --data notes.txt --nvme-dir /nvme/swap --steps 200 --out OUT

Against the same script with ``transformers.Trainer``, the changes are the lines marked "offload:". Everything
else is the Trainer's: TrainingArguments (batch size, accumulation, AdamW settings, clipping, the schedule,
logging, evaluation, checkpoints and ``resume_from_checkpoint``) mean what they mean there.
"""

from __future__ import annotations

import tempfile

from transformers import TrainingArguments

import offload
from common import arguments, load_model, token_blocks
from offload.integrations.hf import OffloadTrainer  # offload: was from transformers import Trainer


def main() -> None:
    ap = arguments(__doc__.splitlines()[1])
    ap.add_argument("--run-dir", default="trainer-run", help="the Trainer's output_dir (logs, checkpoints)")
    a = ap.parse_args()

    model, tokenizer = load_model(a.model)
    blocks = token_blocks(tokenizer, a.data, a.seq_len)
    split = max(1, len(blocks) // 20)
    args = TrainingArguments(
        output_dir=a.run_dir, max_steps=a.steps, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=3e-4, weight_decay=0.1, max_grad_norm=1.0, lr_scheduler_type="cosine", warmup_steps=2,
        logging_steps=5, eval_strategy="steps", eval_steps=max(1, a.steps // 2), save_strategy="steps",
        save_steps=max(1, a.steps // 2), save_total_limit=1, report_to=[], use_cpu=not offload.Config().device.startswith("cuda"))
    config = offload.Config(params="nvme", optimizer="nvme",                     # offload: where the state lives
                            nvme_dir=a.nvme_dir or tempfile.mkdtemp(prefix="offload-example-"))
    trainer = OffloadTrainer(model=model, args=args, train_dataset=blocks[split:], eval_dataset=blocks[:split],
                             processing_class=tokenizer, offload_config=config)  # offload: was Trainer(...)
    trainer.train()  # resume with trainer.train(resume_from_checkpoint=True)
    print(trainer.evaluate())
    if a.out:
        trainer.save_model(a.out)  # a Hugging Face model directory, streamed from the engine
        print(f"wrote {a.out}")
    trainer.engine.close(keep_weights=False)  # removes the swap files


if __name__ == "__main__":
    main()
