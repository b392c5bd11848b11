"""Turn a checkpoint into what dpsgs wrote before module paths (issue 16): every stage's
model state keyed by its position in a stage-local nn.Sequential, integer split points in
the manifest, no `param_names`; sizes and checksums rewritten so the files verify."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import torch

__all__ = ["make_legacy"]


def make_legacy(folder: Path, split: list[int], children: list[str]) -> None:
    """Rewrite checkpoint `folder` in place; `children` names the model's top-level children
    in order (an nn.Sequential's are '0', '1', ...); stage k began at child ([0] + split)[k]."""
    manifest = json.loads((folder / "manifest.json").read_text())
    firsts = [0, *split]
    for shard in manifest["shards"]:
        file = folder / shard["file"]
        obj = torch.load(io.BytesIO(file.read_bytes()), weights_only=True)
        first = firsts[obj["stage"]]

        def old(key: str) -> str:
            head, _, rest = key.partition(".")
            return f"{children.index(head) - first}.{rest}"

        state = obj["state"]
        state["model"] = {old(k): v for k, v in state["model"].items()}
        if "replica_buffers" in state:
            state["replica_buffers"] = {r: {old(k): v for k, v in b.items()}
                                        for r, b in state["replica_buffers"].items()}
        buf = io.BytesIO()
        torch.save(obj, buf)
        data = buf.getvalue()
        file.write_bytes(data)
        shard["bytes"], shard["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    manifest["meta"]["split"] = list(split)
    manifest["meta"].pop("param_names", None)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
