"""Load an exported model with ``deepspeed`` made unimportable and run one batch.

    python tests/dist/export_load_blocked.py EXPORT_DIR BATCH.pt OUT.pt

BATCH.pt: keyword arguments of ``VLMoEModel.forward``; OUT.pt gets pooled, cls, hidden and every head's logits,
plus the class names of the model's MoE FFNs. Exits non-zero if anything imported deepspeed.
"""
import sys

sys.modules["deepspeed"] = None  # `import deepspeed` (and any deepspeed.*) now raises ImportError

import torch  # noqa: E402
from transformers import AutoModel  # noqa: E402

from pipeline.hf import register_auto_classes  # noqa: E402


def main(export_dir: str, batch_path: str, out_path: str) -> None:
    register_auto_classes()
    model = AutoModel.from_pretrained(export_dir).eval()
    batch = torch.load(batch_path)
    with torch.no_grad():
        out = model(**batch)
    ffns = sorted({type(m).__name__ for name, m in model.named_modules() if name.count(".ffn.") and "Sparse" in
                   type(m).__name__})
    assert sys.modules.get("deepspeed") is None, "deepspeed was imported"
    torch.save({"pooled": out.pooled, "cls": out.cls, "hidden": out.last_hidden_state, "logits": out.logits,
                "ffn_classes": ffns, "model_class": type(model).__name__}, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:4])
