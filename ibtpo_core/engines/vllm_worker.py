"""Methods added to every vLLM worker (``LLM(worker_extension_cls=...)``), called by name
through ``collective_rpc``. Imported inside vLLM's worker processes; keep it light."""
from __future__ import annotations


class WorkerExtension:
    def load_state(self, blob: bytes) -> int:
        """Copy the weights in ``blob`` (a state dict with the checkpoint's names, serialised by
        safetensors in memory: vLLM's RPC decodes bare tensors as lists) into the served model,
        in place, by vLLM's in-place reload (what ``reload_weights`` does with a checkpoint path:
        it restores the parameters that post-load processing repacked, maps checkpoint names to
        vLLM's fused ones, casts, and processes them again); then the tied head as after a
        reload. Returns how many tensors were given."""
        from safetensors.torch import load

        state = load(blob)
        self.reload_weights(weights_iterator=iter(state.items()))
        self.refresh_tied_lm_head()
        return len(state)

    def refresh_tied_lm_head(self) -> bool:
        """Redo the output head's weight processing after an in-place reload.

        With tied embeddings the checkpoint holds no ``lm_head`` weight, so the reload skips
        the head, and on CPU the head computes from a pre-packed copy of the old embedding
        matrix (measured: log-probs of the new body with the old head). Re-running the head's
        post-load processing packs the new matrix. On GPU the head reads the shared matrix and
        this is a cheap no-op. Returns whether the model has a tied head.
        """
        model = self.model_runner.model
        head = getattr(model, "lm_head", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        if head is None or embed is None or head.weight is not embed.weight:
            return False
        head.quant_method.process_weights_after_loading(head)
        return True
