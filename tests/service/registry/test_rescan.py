"""Two replicas sharing one store: `rescan` brings a running registry in line with what the other replica
did to the store (upload, replace, deactivate, delete) without a restart, leaves another replica's
in-flight temp folder alone, and a name deleted elsewhere while a request holds it is freed at release."""
import pytest
import torch

from _fixtures import decoder_logits, hf_logits, input_ids, make_registry, peft_adapter, run
from service.registry import Conflict, NotFound


def test_rescan_follows_another_replicas_changes(tmp_path):
    lora, ia3, adalora = peft_adapter("lora"), peft_adapter("ia3"), peft_adapter("adalora")
    root = tmp_path / "store"
    ids = input_ids()

    async def scenario():
        a, b = make_registry(root), make_registry(root)          # two replicas, one store, own models
        await a.scan()
        await b.scan()
        await a.register_files("x", lora.config, lora.weights)
        with pytest.raises(NotFound):
            b.get("x")
        (root / ".tmp-upload-elsewhere").mkdir()                  # another replica mid-upload
        assert await b.rescan() == {"added": ["x"], "removed": [], "changed": [], "updated": []}
        assert (root / ".tmp-upload-elsewhere").is_dir()
        lease = await b.acquire("x")
        got_x = decoder_logits(b.model, lease.model_name, ids)
        b.release(lease)

        await a.register_files("x", adalora.config, adalora.weights, replace=True)    # replaced on a
        held = await b.acquire("x")                               # b still serves the old one meanwhile
        assert await b.rescan() == {"added": [], "removed": [], "changed": ["x"], "updated": []}
        old_name = held.model_name
        lease = await b.acquire("x")
        got_replaced = decoder_logits(b.model, lease.model_name, ids)
        b.release(lease)
        b.release(held)
        await b.drain()
        assert old_name not in (b.model.peft_config or {})     # the replaced version left b's model

        await a.register_files("y", ia3.config, ia3.weights)
        await a.deactivate("x")
        await b.rescan()
        with pytest.raises(Conflict):
            await b.acquire("x")
        assert b.get("x").tier == "stored"
        await a.delete("y")
        report = await b.rescan()
        assert report["removed"] == ["y"] and report["added"] == []
        with pytest.raises(NotFound):
            b.get("y")
        assert await b.rescan() == {"added": [], "removed": [], "changed": [], "updated": []}
        return got_x, got_replaced

    got_x, got_replaced = run(scenario())
    torch.testing.assert_close(got_x, hf_logits(lora.model, ids), atol=1e-4, rtol=0)
    torch.testing.assert_close(got_replaced, hf_logits(adalora.model, ids), atol=1e-4, rtol=0)
