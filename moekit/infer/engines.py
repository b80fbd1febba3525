"""What `moekit serve` generates with: a model, its tokenizer and a token-by-token KV-cached sampler, for a moekit
run or a Hugging Face MoE checkpoint folder, resident or with offloaded experts (`moekit.infer.load_offloaded*`).

The sampler draws each token exactly as `MoELM.generate` does (`moekit.models.lm.sample_next`: greedy at
temperature 0, else temperature + nucleus sampling, one `torch.Generator` per request), so a greedy completion
equals `moekit generate --temperature 0`'s tokens; it yields one token at a time, which streaming needs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moekit.models.lm import sample_next
from moekit.utils.deps import require


def role_tagged(messages: list[dict[str, str]]) -> str:
    """The simple chat template of moekit runs: "role: content" lines, then "assistant:" to answer."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


@dataclass
class Engine:
    """A loaded model ready to serve.

    name: the model id clients send. model: the module (`steer`/`dynamic_k` act on it). tokenizer: a moekit
    `BPETokenizer` or a transformers tokenizer. eos_id: the id that ends an answer (None: none). max_len: the
    context length. kind: "moekit" | "hf". offloader: the expert cache's `Offloader` when offloaded, else None.
    """

    name: str
    model: nn.Module
    tokenizer: Any
    eos_id: int | None
    max_len: int
    kind: str
    offloader: Any = None

    def encode(self, text: str) -> list[int]:
        if self.kind == "hf":
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        return list(self.tokenizer.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a chat: the tokenizer's chat template (Hugging Face, when it has one), else `role_tagged`."""
        if self.kind == "hf" and getattr(self.tokenizer, "chat_template", None):
            out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(out, dict) or hasattr(out, "input_ids"):
                out = out["input_ids"]
            return [int(t) for t in out]
        return self.encode(role_tagged(messages))

    @torch.no_grad()
    def tokens(
        self, ids: list[int], max_new_tokens: int, *, temperature: float, top_p: float, generator: torch.Generator
    ) -> Iterator[int]:
        """Generate after prompt `ids`: yields each new token id, the eos id last when the model produced it;
        at most `max_new_tokens`, and never past `max_len`."""
        device = next(self.model.parameters()).device
        x = torch.tensor([ids], device=device)
        n = min(max_new_tokens, self.max_len - len(ids))
        if self.kind == "moekit":
            cache = self.model.new_cache(1)
            logits = self.model(x, cache=cache).logits[:, -1]
            step = lambda t: self.model(t, cache=cache).logits[:, -1]  # noqa: E731
        else:
            out = self.model(input_ids=x, use_cache=True)
            state = {"pkv": out.past_key_values}
            logits = out.logits[:, -1]

            def step(t: torch.Tensor) -> torch.Tensor:
                o = self.model(input_ids=t, past_key_values=state["pkv"], use_cache=True)
                state["pkv"] = o.past_key_values
                return o.logits[:, -1]

        for i in range(n):
            nxt = sample_next(logits, temperature, top_p, generator)  # [1]
            tok = int(nxt[0])
            yield tok
            if tok == self.eos_id or i == n - 1:
                return
            logits = step(nxt[:, None])


def is_hf_folder(path: Path) -> bool:
    """True for a Hugging Face checkpoint folder (config.json with a `model_type`), False for a moekit run."""
    f = path / "config.json"
    if not f.is_file():
        return False
    try:
        cfg = json.loads(f.read_text())
    except ValueError:
        return False
    return isinstance(cfg, dict) and "model_type" in cfg


def load_engine(
    path: str | Path,
    *,
    name: str | None = None,
    expert_memory: str | int | float | None = None,
    policy: str = "lru",
    prefetch: bool = False,
    device: str = "cpu",
) -> Engine:
    """An `Engine` for a moekit run folder (with `tokenizer.json`) or a Hugging Face MoE checkpoint folder (with
    its tokenizer), patched by `moekit.hf.patch` so steering works; `expert_memory` offloads the experts."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: expected a moekit run folder or a Hugging Face checkpoint folder")
    if expert_memory is None and (prefetch or policy != "lru"):
        raise ValueError("policy/prefetch: need expert_memory (the experts are resident without it)")
    name = name or path.resolve().name
    offload = dict(expert_memory=expert_memory, policy=policy, prefetch=prefetch, device=device)
    if is_hf_folder(path):
        tf = require("transformers")
        try:
            tok = tf.AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as exc:
            raise FileNotFoundError(f"{path}: no tokenizer found next to the checkpoint ({exc})") from None
        if expert_memory is None:
            from moekit.hf import patch

            model = patch(tf.AutoModelForCausalLM.from_pretrained(str(path))).to(device).eval()
        else:
            from moekit.infer.offload_hf import load_offloaded_hf

            model = load_offloaded_hf(path, **offload)
        max_len = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        eos = model.config.eos_token_id if tok.eos_token_id is None else tok.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
        return Engine(name, model, tok, eos, max_len, "hf", getattr(model, "offloader", None))
    from moekit.data import BPETokenizer
    from moekit.train import load_model

    tok_path = path / "tokenizer.json"
    if not tok_path.is_file():
        raise FileNotFoundError(f"{tok_path} is missing: the run has no tokenizer")
    if expert_memory is None:
        model = load_model(path).to(device).eval()
    else:
        from moekit.infer import load_offloaded

        model = load_offloaded(path, **offload)
    tok = BPETokenizer.load(tok_path)
    return Engine(name, model, tok, tok.eos_id, model.config.max_seq_len, "moekit", getattr(model, "offloader", None))


__all__ = ["Engine", "is_hf_folder", "load_engine", "role_tagged"]
