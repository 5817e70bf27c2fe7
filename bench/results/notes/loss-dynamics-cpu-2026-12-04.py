import sys, time, argparse
sys.path.insert(0, "/work/main/bench")
import torch, transformers
from scale_model import llama_config, TokenBatches, causal_lm_loss

p = argparse.ArgumentParser()
p.add_argument("--layers", type=int, default=2)
p.add_argument("--lr", type=float, default=1e-4)
p.add_argument("--warmup", type=int, default=0)
p.add_argument("--seq", type=int, default=256)
p.add_argument("--steps", type=int, default=8)
a = p.parse_args()
torch.set_num_threads(2)
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(llama_config(hidden=4096, layers=a.layers, intermediate=11008, heads=32, vocab=32000, seq=a.seq))
model.train()
opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / a.warmup)) if a.warmup else None
data = TokenBatches(batch=2, seq=a.seq)
print(f"L={a.layers} lr={a.lr} warmup={a.warmup} seq={a.seq} params={sum(p.numel() for p in model.parameters())/1e6:.0f}M", flush=True)
for step in range(a.steps):
    t0 = time.time(); losses = []
    lr_now = opt.param_groups[0]["lr"]
    for k in range(2):
        ids = data.get(step * 2 + k)
        loss = causal_lm_loss(model(input_ids=ids, use_cache=False).logits, ids)
        (loss / 2).backward()
        losses.append(loss.item())
    opt.step(); opt.zero_grad(set_to_none=True)
    if sched: sched.step()
    print(f"step {step} lr {lr_now:.2e} loss {sum(losses)/2:.4f} ({time.time()-t0:.1f}s)", flush=True)
