"""Short training probes of token usefulness: does a resampler choice keep the vocabulary in use and make the
decoder rely on its tokens?

    python benchmarks/collapse_probe.py --steps 200 --set temperature=0.02
    python benchmarks/collapse_probe.py --steps 200 --set sample_entropy_weight=0 batch_entropy_weight=0
    python benchmarks/collapse_probe.py --steps 100 --set estimator=softmax temperature=0.1

Trains the tokenizer of `--config` (its tokenizer init_args, overridden by --set) with AdamW on MNIST for
`--steps` steps of batch 64 and, every `--every` steps, prints JSON with the loss parts, the distinct ids
on 200 validation digits, their PSNR/SSIM (2-step Euler decode) and the shuffle gap: the relative increase
of the flow loss when tokens are shuffled across the batch (0 = the decoder ignores its tokens).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import yaml

from v2flow import LLMVocabulary, V2FlowTokenizer
from v2flow.data import load_mnist
from v2flow.metrics import psnr_ssim


def parse_value(text: str):
    return yaml.safe_load(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/mnist.yaml")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="tokenizer init_args overrides")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    init = yaml.safe_load(open(a.config))["model"]["tokenizer"]["init_args"]
    overrides = dict(item.split("=", 1) for item in a.set)
    init.update({k: parse_value(v) for k, v in overrides.items()})
    torch.manual_seed(a.seed)
    tok = V2FlowTokenizer(**init)
    tok.set_vocabulary(LLMVocabulary.load(init["vocab_source"], init["num_entries"], init["vocab_selection"]))
    train, _ = load_mnist("train")
    val, _ = load_mnist("val")
    val = val[:200]
    opt = torch.optim.AdamW(tok.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    g = torch.Generator().manual_seed(a.seed)
    start = time.perf_counter()
    for step in range(a.steps + 1):
        tok.train()
        batch = train[torch.randint(len(train), (a.batch_size,), generator=g)]
        out = tok.loss(batch, generator=g)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(tok.parameters(), 1.0)
        opt.step()
        warmup.step()
        if step % a.every == 0:
            tok.eval()
            enc = tok.encode(val)
            recon = tok.decode(enc.ids, num_steps=2, generator=torch.Generator().manual_seed(0)).images
            record = {
                "step": step,
                "seconds": round(time.perf_counter() - start, 1),
                "overrides": overrides,
                **{k: round(float(v), 4) for k, v in out.parts.items()},
                "distinct_ids_val200": tok.usage(enc.indices)["distinct_ids"],
                **{k: round(v, 3) for k, v in psnr_ssim(recon, val).items()},
                "shuffle_gap": round(tok.token_usefulness(val)["shuffle_gap"], 4),
            }
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
