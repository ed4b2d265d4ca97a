"""One fine-tuning step of a Hugging Face GPT-2 with Highway-BP (pip install 'highway-bp[hf]').

    python examples/huggingface_gpt2.py [--threads N]   (default: torch's; it prints the count)

A tiny GPT-2 is built from a config (no download). `from_huggingface` adapts it in place:
the same modules, parameter names and state_dict; only the backward of the block stack
changes. With k = L (2 sub-layers per block) the gradient equals plain autograd's.
"""

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import highwaybp as hbp
from highwaybp.train.threads import example_threads

example_threads()  # torch's default thread count unless --threads N; printed

torch.manual_seed(0)
config = GPT2Config(n_layer=3, n_embd=64, n_head=4, vocab_size=100, n_positions=64,
                    bos_token_id=0, eos_token_id=0,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # dropout off: the two
# models would draw different masks (with dropout on, Highway still replays its own masks)
model = GPT2LMHeadModel(config)
reference = GPT2LMHeadModel(config)
reference.load_state_dict(model.state_dict())

hbp.from_huggingface(model, gamma=0.2, method=hbp.Highway(k=2))   # in place
ids = torch.randint(0, 100, (4, 32))


def gradients(m):
    m.zero_grad()
    m(ids, labels=ids, use_cache=False).loss.backward()
    return torch.cat([p.grad.flatten() for p in m.parameters()])


g_ref = gradients(reference)
for method in (hbp.Highway(k=2), hbp.Highway(k=2 * config.n_layer)):
    with hbp.use_method(model, method):
        g = gradients(model)
    cos = torch.nn.functional.cosine_similarity(g.double(), g_ref.double(), dim=0).item()
    print(f"{method}: cosine to plain autograd {cos:.5f}")

opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
loss = model(ids, labels=ids, use_cache=False).loss
opt.zero_grad()
loss.backward()
opt.step()
print(f"one Highway(k=2) fine-tuning step done, loss {loss.item():.3f}")
