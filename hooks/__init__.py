"""mechbiqa_hooks: the hooked layer over `mechbiqa.model.MPLUGOwl2`.

The model itself is a TransformerLens `HookedRootModule` whose `HookPoint`s
sit at the module paths listed in `names`. This package adds what works on
those hook points: name builders (`names`), an `ActivationCache` view
(`cache`), the nnsight view of the same model (`nnsight_view`), patch and
ablation hooks (`patch`) and the recorder whose hooks keep the selected rows of
each cached hook (`record`; the loops that write them into an HDF5 store are
`mechbiqa.store.record`, a layer above). Installed under the import name
``mechbiqa_hooks``.
"""

from mechbiqa_hooks import names, patch
from mechbiqa_hooks.nnsight_view import nnsight_view

__all__ = ["names", "nnsight_view", "patch"]
