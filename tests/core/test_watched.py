"""adapters_core/watched.py: which changes move the count a kept decode plan relies on, and which do not."""

import threading

import torch
from torch import nn

import adapters_core as ac
from adapters_core import watched
from adapters_core.layer import AdapterLayer


class Block(watched.Watched, nn.Module):
    _unwatched = frozenset({"scratch"})

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)


def moved(change) -> bool:
    before = watched.generation()
    change()
    return watched.generation() > before


def test_attribute_sets_registrations_and_hooks_are_counted():
    block = Block()
    assert moved(lambda: setattr(block, "flag", True))
    assert moved(lambda: delattr(block, "flag"))
    assert moved(lambda: setattr(block, "lin", nn.Linear(4, 4)))                      # a submodule replaced
    assert moved(lambda: block.register_parameter("p", nn.Parameter(torch.ones(2))))
    assert moved(lambda: setattr(block, "p", nn.Parameter(torch.zeros(2))))
    assert moved(lambda: block.register_buffer("b", torch.ones(2)))
    assert moved(lambda: block.add_module("extra", nn.ReLU()))
    assert moved(lambda: block.register_forward_hook(lambda *a: None))
    assert moved(lambda: block.register_forward_pre_hook(lambda *a: None))
    assert moved(lambda: block.to(torch.float64)) and moved(block.float)
    assert not moved(lambda: setattr(block, "scratch", 1)), "a class's own scratch attributes are not counted"


def test_adapter_layer_changes_are_counted_merges_included():
    model = nn.Sequential(nn.Linear(8, 8))
    ac.inject_adapter_in_model(ac.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False), model,
                               adapter_name="a")
    layer = model[0]
    assert isinstance(layer, AdapterLayer)
    assert moved(lambda: setattr(layer, "disabled", True))
    layer.disabled = False
    assert moved(lambda: layer.merge(["a"])) and layer.merged_adapters == ["a"]
    assert moved(layer.unmerge) and layer.merged_adapters == []


def test_counting_from_many_threads_loses_no_change():
    before = watched.generation()
    threads = [threading.Thread(target=lambda: [watched.bump() for _ in range(2000)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert watched.generation() - before >= 8000
