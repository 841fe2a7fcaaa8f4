"""The same model seen through nnsight: one object, two ways in.

`MPLUGOwl2`'s hook points are ordinary submodules, so nnsight reaches them by
the very names `names` builds: ``view.llm.blocks[3].hook_resid_post.output``
in a trace is what ``run_with_cache`` stores under
``"llm.blocks.3.hook_resid_post"``. Nothing is copied: the view wraps the
model in place, and activations are identical by construction (a test checks).

    view = nnsight_view(model)
    with view.trace(input_ids, images=pixels):
        pattern = view.llm.blocks[0].attn.hook_pattern.output.save()   # request modules in execution order
        view.llm.blocks[1].hook_resid_post.output[:, image_positions] = 0  # assignment patches
        logits = view.output.logits.save()

nnsight re-reads the source of the code inside a trace, so traces must live in a
file (``python -c`` fails), and modules must be requested in the order they run.
nnsight instruments the wrapped modules in place: plain forwards of the same model
still give the same numbers but pass through its wrappers; wrap a copy
(``copy.deepcopy(model)``) when timing plain forwards beside traces.
"""

from __future__ import annotations

from nnsight import NNsight

from mechbiqa.model.mplug_owl2 import MPLUGOwl2


def nnsight_view(model: MPLUGOwl2) -> NNsight:
    """Wrap ``model`` (in place, no copy) for nnsight ``trace`` / ``.save()`` / assignment."""
    if not isinstance(model, MPLUGOwl2):
        raise TypeError(f"nnsight_view expects an MPLUGOwl2, got {type(model).__name__}")
    return NNsight(model)
