"""The mPLUG-Owl2 port, one file per part, in reading order.

config.py      ModelConfig (vision, abstractor, llm) <-> the original config.json
vision.py      ViT vision tower
abstractor.py  visual abstractor (64 queries + vit_eos = 65 image tokens)
llm.py         LLaMA with modality-adaptive K/V and norms
generation.py  KV cache and next-token choice
mplug_owl2.py  the composite: encode images, splice, run the LLM, generate
load.py        checkpoint directories in the original layout
processor.py   image preprocessing; tokenizer.py, prompts.py, roles.py: text side
"""

from mechbiqa.model.config import IMAGE_TOKEN_INDEX, AbstractorConfig, LLMConfig, ModelConfig, VisionConfig
from mechbiqa.model.generation import KVCache
from mechbiqa.model.load import CheckpointError, load_pretrained, save_pretrained
from mechbiqa.model.mplug_owl2 import ModelOutput, MPLUGOwl2

__all__ = [
    "IMAGE_TOKEN_INDEX", "AbstractorConfig", "CheckpointError", "KVCache", "LLMConfig", "MPLUGOwl2",
    "ModelConfig", "ModelOutput", "VisionConfig", "load_pretrained", "save_pretrained",
]
