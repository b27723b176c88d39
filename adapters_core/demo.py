"""A runnable tour of adapters_core (`make serve` runs it until the HTTP service lands).

It builds a small Llama-named torch model, injects three LoRA adapters and one IA3 adapter, saves one
in PEFT's format and loads it back under a new name, then runs one mixed batch where every row uses a
different adapter and checks each row against running that adapter alone.
"""

from __future__ import annotations

import tempfile

import torch
from torch import nn

import adapters_core as ac


class Block(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.q_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.up_proj, self.down_proj = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        x = x + self.v_proj(torch.tanh(self.q_proj(x)))
        return x + self.down_proj(torch.relu(self.up_proj(x)))


class TinyDecoder(nn.Module):
    """Not a real language model: just module names and shapes like a Llama's."""

    def __init__(self, vocab: int = 100, d: int = 32, hidden: int = 64, layers: int = 2):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d, hidden) for _ in range(layers))
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


def main() -> None:
    torch.manual_seed(0)
    model = TinyDecoder().eval()
    for i, (r, targets) in enumerate([(4, ["q_proj", "v_proj"]), (8, ["up_proj", "down_proj"]),
                                      (2, ["q_proj", "down_proj"])]):
        cfg = ac.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False)
        ac.inject_adapter_in_model(cfg, model, f"lora{i}")
    ac.inject_adapter_in_model(ac.IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"],
                                            init_ia3_weights=False), model, "ia3")
    with tempfile.TemporaryDirectory() as folder:
        ac.save_adapter(model, folder, "lora1")
        ac.load_adapter(model, folder, adapter_name="lora1_copy")
        print(f"saved lora1 in PEFT format and loaded it back as lora1_copy from {folder}")
    model.eval()
    names = ["lora0", "lora1", "__base__", "ia3", "lora2", "lora1_copy"]
    ids = torch.randint(0, 100, (len(names), 6))
    with torch.inference_mode():
        with ac.mixed_batch(model, names):
            mixed = model(ids)
        print(f"one forward, {len(names)} rows, {len(set(names))} different adapters:")
        for row, name in enumerate(names):
            if name == "__base__":
                ac.disable_adapters(model)
                alone = model(ids[row:row + 1])
                ac.enable_adapters(model)
            else:
                ac.set_adapter(model, name)
                alone = model(ids[row:row + 1])
            diff = (mixed[row] - alone[0]).abs().max().item()
            print(f"  row {row}: {name:<11} max |mixed - alone| = {diff:.2e}")


if __name__ == "__main__":
    main()
