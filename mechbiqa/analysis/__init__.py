"""Analysis functions over tensors and stores (logit lens, attribution, patching, instability, probes).

No printing here: each function returns arrays or dataclasses that `mechbiqa.reports` renders.
"""
